//! Python `str` semantics that HF's processing code relies on: whitespace as `str.isspace` defines it,
//! and lengths in code points.

/// Python's `str.isspace` for one character: Rust's Unicode `White_Space` plus the ASCII information
/// separators U+001C..U+001F, which Python also treats as whitespace.
pub(crate) fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.strip()`.
pub(crate) fn strip(text: &str) -> &str {
    text.trim_matches(is_python_whitespace)
}

/// Python's `len(s) - len(s.lstrip())`, in code points.
pub(crate) fn leading_whitespace_chars(text: &str) -> usize {
    text.chars()
        .take_while(|&c| is_python_whitespace(c))
        .count()
}

/// Python's `len(s) - len(s.rstrip())`, in code points.
pub(crate) fn trailing_whitespace_chars(text: &str) -> usize {
    text.chars()
        .rev()
        .take_while(|&c| is_python_whitespace(c))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn information_separators_count_as_whitespace_like_python() {
        assert_eq!(strip("\u{1f} a b\u{3000}\n"), "a b");
        assert_eq!(leading_whitespace_chars("\u{a0} x "), 2);
        assert_eq!(trailing_whitespace_chars("x \u{2009}"), 2);
        assert_eq!(trailing_whitespace_chars("   "), 3);
    }
}
