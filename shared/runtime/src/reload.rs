//! Values built from files and rebuilt when the files change, without a restart: TLS certificates rotated by
//! cert-manager, the gateway's API keys.
//!
//! A [`Reloading`] reads its files, builds a value from their bytes and then re-reads them every `interval` on a
//! background task; when any file's bytes differ from the last good build, it builds again and swaps the value
//! in. A build that fails (a half-written file, a key that does not match its certificate) keeps the previous
//! value and is logged: a bad rotation never takes a working server down. Polling the contents (not mtimes or
//! inotify) follows Kubernetes' Secret volumes, which swap a `..data` symlink, and costs a few small reads.
//!
//! The task stops by itself once the last [`Reloading`] handle is dropped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Why a file-built value could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The files were read but their contents are not usable.
    #[error("{0}")]
    Build(String),
}

type Build<T> = dyn Fn(&[Vec<u8>]) -> Result<T, ReloadError> + Send + Sync;

struct Inner<T> {
    name: &'static str,
    files: Vec<PathBuf>,
    build: Box<Build<T>>,
    current: RwLock<(Arc<T>, Vec<Vec<u8>>)>,
}

/// A value built from files, rebuilt when they change (see the module doc). Cheap to clone.
pub struct Reloading<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Reloading<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("name", &self.inner.name)
            .field("files", &self.inner.files)
            .finish_non_exhaustive()
    }
}

fn read_all(files: &[PathBuf]) -> Result<Vec<Vec<u8>>, ReloadError> {
    files
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(|source| ReloadError::Read {
                path: path.clone(),
                source,
            })
        })
        .collect()
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Reads `files` and builds the first value (an error here is a startup error), then, when `interval` is
    /// non-zero and a tokio runtime is running, re-reads them every `interval`. `name` names the value in logs.
    pub fn load(
        name: &'static str,
        files: Vec<PathBuf>,
        interval: Duration,
        build: impl Fn(&[Vec<u8>]) -> Result<T, ReloadError> + Send + Sync + 'static,
    ) -> Result<Self, ReloadError> {
        let contents = read_all(&files)?;
        let value = build(&contents)?;
        let inner = Arc::new(Inner {
            name,
            files,
            build: Box::new(build),
            current: RwLock::new((Arc::new(value), contents)),
        });
        if !interval.is_zero()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(watch(Arc::downgrade(&inner), interval));
        }
        Ok(Self { inner })
    }

    /// The value built from the files as they were at the last good read.
    pub fn current(&self) -> Arc<T> {
        let current = self
            .inner
            .current
            .read()
            .unwrap_or_else(|err| err.into_inner());
        Arc::clone(&current.0)
    }

    /// Re-reads the files now; rebuilds when they changed. Returns whether the value changed.
    pub fn reload(&self) -> Result<bool, ReloadError> {
        reload(&self.inner)
    }

    /// The files the value is built from.
    pub fn files(&self) -> &[PathBuf] {
        &self.inner.files
    }
}

fn reload<T>(inner: &Inner<T>) -> Result<bool, ReloadError> {
    let contents = read_all(&inner.files)?;
    {
        let current = inner.current.read().unwrap_or_else(|err| err.into_inner());
        if current.1 == contents {
            return Ok(false);
        }
    }
    let value = (inner.build)(&contents)?;
    let mut current = inner.current.write().unwrap_or_else(|err| err.into_inner());
    *current = (Arc::new(value), contents);
    Ok(true)
}

async fn watch<T>(inner: std::sync::Weak<Inner<T>>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        match reload(&inner) {
            Ok(true) => tracing::info!(what = inner.name, files = ?inner.files, "reloaded"),
            Ok(false) => {}
            Err(err) => tracing::warn!(
                what = inner.name,
                %err,
                "files changed but cannot be used; keeping the previous version"
            ),
        }
    }
}

/// A path from config: `None` when empty.
pub fn optional_path(path: &Path) -> Option<PathBuf> {
    (!path.as_os_str().is_empty()).then(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kosmos-reload-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn a_changed_file_rebuilds_and_a_bad_one_keeps_the_last_good_value() {
        let dir = temp_dir("rebuild");
        let file = dir.join("n");
        std::fs::write(&file, "1").expect("write");
        let parse = |contents: &[Vec<u8>]| -> Result<u32, ReloadError> {
            std::str::from_utf8(&contents[0])
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .ok_or_else(|| ReloadError::Build("not a number".into()))
        };
        let value = Reloading::load("n", vec![file.clone()], Duration::ZERO, parse).expect("load");
        assert_eq!(*value.current(), 1);
        assert!(!value.reload().expect("same"));
        std::fs::write(&file, "2").expect("write");
        assert!(value.reload().expect("changed"));
        assert_eq!(*value.current(), 2);
        std::fs::write(&file, "two").expect("write");
        assert!(value.reload().is_err());
        assert_eq!(*value.current(), 2, "a bad file keeps the last good value");
        std::fs::remove_file(&file).expect("remove");
        assert!(matches!(value.reload(), Err(ReloadError::Read { .. })));
        assert_eq!(*value.current(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn the_watch_task_picks_up_a_change_and_stops_with_the_last_handle() {
        let dir = temp_dir("watch");
        let file = dir.join("n");
        std::fs::write(&file, "a").expect("write");
        let interval = Duration::from_millis(20);
        let value = Reloading::load("n", vec![file.clone()], interval, |contents| {
            Ok(contents[0].clone())
        })
        .expect("load");
        std::fs::write(&file, "b").expect("write");
        // Bounded: the task re-reads every 20 ms; 10 s covers any scheduling delay of a loaded machine.
        for _ in 0..500 {
            if value.current().as_slice() == b"b" {
                break;
            }
            tokio::time::sleep(interval).await;
        }
        assert_eq!(value.current().as_slice(), b"b");
        let weak = Arc::downgrade(&value.inner);
        drop(value);
        assert!(
            weak.upgrade().is_none(),
            "the task holds no strong handle between reads"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
