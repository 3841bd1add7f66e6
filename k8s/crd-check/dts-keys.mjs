// Unknown-key ("additionalProperties: false") checking for the @kubernetes-models classes, whose ajv validators
// accept any extra key. The allowed keys come from the packages' own TypeScript declarations (.d.ts), which are
// generated from the same CRD schemas: object literal types, `Array<…>`, index signatures (`{[key: string]: …}`:
// any key allowed) and named types resolved through their `import` lines. A type it cannot resolve is not checked.
import { readFileSync, existsSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);
const cache = new Map();

function resolveImport(fromFile, spec) {
  let base;
  if (spec.startsWith(".")) base = path.resolve(path.dirname(fromFile), spec);
  else {
    const [scopeOrName, ...rest] = spec.split("/");
    const pkg = scopeOrName.startsWith("@") ? `${scopeOrName}/${rest.shift()}` : scopeOrName;
    let root;
    try {
      root = path.dirname(require.resolve(`${pkg}/package.json`, { paths: [path.dirname(fromFile)] }));
    } catch {
      return null;
    }
    base = path.join(root, ...rest);
  }
  base = base.replace(/\.(m?js)$/, "");
  for (const candidate of [`${base}.d.ts`, path.join(base, "index.d.ts")]) if (existsSync(candidate)) return candidate;
  return null;
}

// Declaration files without comments (JSDoc may hold any character).
function strip(text) {
  return text.replace(/\/\*[\s\S]*?\*\//g, " ").replace(/^\s*\/\/[^\n]*/gm, " ");
}

// A tiny parser of the TypeScript type syntax used in these declaration files.
class Parser {
  constructor(text, file) {
    this.s = text;
    this.i = 0;
    this.file = file;
  }
  ws() { while (this.i < this.s.length && /\s/.test(this.s[this.i])) this.i++; }
  peek(str) { this.ws(); return this.s.startsWith(str, this.i); }
  eat(str) { if (this.peek(str)) { this.i += str.length; return true; } return false; }
  ident() { this.ws(); const m = /^[A-Za-z_$][\w$.]*/.exec(this.s.slice(this.i)); if (!m) return null; this.i += m[0].length; return m[0]; }
  // Skips to the end of the current member (`;` at depth 0) or the closing brace.
  skipMember() {
    let depth = 0;
    while (this.i < this.s.length) {
      const c = this.s[this.i];
      if ("{(<[".includes(c)) depth++;
      else if ("})>]".includes(c)) { if (depth === 0) return; depth--; }
      else if (c === ";" && depth === 0) { this.i++; return; }
      this.i++;
    }
  }
  // After `{`: members until `}`. Returns {kind: "object", props} or {kind: "map"}.
  objectBody() {
    const props = {};
    let map = false;
    for (;;) {
      if (this.eat("}")) break;
      if (this.peek("[")) { map = true; this.skipMember(); continue; }
      const start = this.i;
      let name = null;
      this.ws();
      const quoted = /^"([^"]*)"/.exec(this.s.slice(this.i));
      if (quoted) { name = quoted[1]; this.i += quoted[0].length; } else name = this.ident();
      if (name === "static" || name === "constructor" || name === "readonly" || name === null) { this.i = Math.max(this.i, start + 1); this.skipMember(); continue; }
      this.eat("?");
      if (!this.eat(":")) { this.skipMember(); continue; }
      props[name] = this.type();
      this.eat(";");
    }
    return map && Object.keys(props).length === 0 ? { kind: "map" } : { kind: "object", props, map };
  }
  type() {
    const alternatives = [this.single()];
    while (this.eat("|")) alternatives.push(this.single());
    return alternatives.length === 1 ? alternatives[0] : { kind: "leaf" };
  }
  single() {
    let t;
    if (this.eat("{")) t = this.objectBody();
    else if (this.eat("(")) { t = this.type(); this.eat(")"); }
    else if (this.peek('"') || this.peek("'")) { this.ws(); const q = this.s[this.i]; this.i = this.s.indexOf(q, this.i + 1) + 1; t = { kind: "leaf" }; }
    else {
      const name = this.ident();
      if (name === "Array" && this.eat("<")) { t = { kind: "array", of: this.type() }; this.eat(">"); }
      else if (name && this.eat("<")) { let depth = 1; while (depth && this.i < this.s.length) { const c = this.s[this.i++]; if (c === "<") depth++; if (c === ">") depth--; } t = { kind: "leaf" }; }
      else if (name && /^I[A-Z]/.test(name)) t = { kind: "ref", name, file: this.file };
      else { if (!name) this.i++; t = { kind: "leaf" }; }
    }
    for (;;) {
      if (this.eat("[]")) t = { kind: "array", of: t };
      else if (this.peek("[")) { this.i = this.s.indexOf("]", this.i) + 1; t = { kind: "leaf" }; } // X["key"]
      else break;
    }
    return t;
  }
}

// The type of the class or interface `name` declared (or re-exported) in `file`.
function declared(file, name) {
  const key = `${file}#${name}`;
  if (cache.has(key)) return cache.get(key);
  cache.set(key, { kind: "leaf" });
  const text = strip(readFileSync(file, "utf8"));
  let result = { kind: "leaf" };
  const interfaceMatch = new RegExp(`export interface ${name}\\b[^{]*\\{`).exec(text);
  // The class of an interface lists every property, the inherited ones included.
  const className = name.replace(/^I/, "");
  const classMatch = new RegExp(`export declare class ${className}\\b[^{]*\\{`).exec(text);
  const aliasMatch = new RegExp(`\\b(\\w+) as ${name}\\b`).exec(text); // export type { IX as ILongName }
  const body = (m) => { const p = new Parser(text, file); p.i = m.index + m[0].length; return p.objectBody(); };
  if (classMatch || interfaceMatch) {
    // Interface members carry the real types (class members may be `IX["key"]`); the class adds inherited ones.
    const fromClass = classMatch ? body(classMatch) : { kind: "object", props: {} };
    const fromInterface = interfaceMatch ? body(interfaceMatch) : { kind: "object", props: {} };
    if (fromClass.kind === "map" || fromInterface.kind === "map") result = { kind: "map" };
    else result = { kind: "object", props: { ...fromClass.props, ...fromInterface.props }, map: fromClass.map || fromInterface.map };
  } else if (aliasMatch) {
    result = declared(file, aliasMatch[1]);
  } else {
    const imp = new RegExp(`import \\{[^}]*\\b${name}\\b[^}]*\\} from "([^"]+)"`).exec(text);
    const target = imp && resolveImport(file, imp[1]);
    if (target) result = declared(target, name);
  }
  cache.set(key, result);
  return result;
}

function resolveRef(t) {
  if (t.kind !== "ref") return t;
  const text = strip(readFileSync(t.file, "utf8"));
  const imp = new RegExp(`import \\{[^}]*\\b${t.name}\\b[^}]*\\} from "([^"]+)"`).exec(text);
  if (imp) {
    const target = resolveImport(t.file, imp[1]);
    return target ? declared(target, t.name) : { kind: "leaf" };
  }
  return declared(t.file, t.name);
}

// Unknown keys of `value` against type `t`, as "path.key" strings.
export function unknownKeys(value, t, at = "") {
  t = resolveRef(t);
  const out = [];
  if (t.kind === "array" && Array.isArray(value)) value.forEach((v, i) => out.push(...unknownKeys(v, t.of, `${at}[${i}]`)));
  else if (t.kind === "object" && value && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) {
      if (k in t.props) out.push(...unknownKeys(v, t.props[k], at ? `${at}.${k}` : k));
      else if (!t.map) out.push(at ? `${at}.${k}` : k);
    }
  }
  return out;
}

// The root type of a model module, e.g. ("@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject", "IScaledObject").
export function rootType(moduleSpec, name) {
  const file = resolveImport(path.join(path.dirname(new URL(import.meta.url).pathname), "x.js"), moduleSpec);
  if (!file) throw new Error(`no declarations for ${moduleSpec}`);
  return declared(file, name);
}
