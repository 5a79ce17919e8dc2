//! How far a backfill got: per file, the rows whose records the broker acknowledged (or that
//! were rejected), saved after every chunk, so a run stopped or killed resumes where its last
//! acknowledged chunk ended. With the count goes a hash of those rows' bytes: a resumed run
//! reads the rows it skips again and checks them against it, so a file changed since (a row
//! edited, removed or added before the mark, whatever its size) is refused, never resumed at
//! a position that means another row; rows appended after the mark are sent. A file done
//! whole is skipped while its size and the hash of its first 64 KiB are unchanged (else it is
//! read again, its done rows checked the same way).

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The checkpoint file's content.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Format version (1).
    pub version: u32,
    /// The input topic the rows went to.
    pub topic: String,
    /// One mark per file started.
    pub files: Vec<FileMark>,
}

/// How far one file got.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileMark {
    /// The file's canonical path.
    pub path: PathBuf,
    /// Its size in bytes when it was started.
    pub size: u64,
    /// xxh3 of its first 64 KiB, hex.
    pub head: String,
    /// Rows done (acknowledged by the broker, or rejected), from the start of the file.
    pub rows: u64,
    /// xxh3 of those rows' bytes as read (hex).
    pub prefix: String,
    /// The whole file is done.
    pub done: bool,
}

/// Why a checkpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing it failed.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The checkpoint file (or the history file being identified).
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A history file cannot be read to identify it.
    #[error("{path}: {source}")]
    File {
        /// The history file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// It is not a checkpoint of this tool.
    #[error("checkpoint {path} is unreadable ({message}): pass another --checkpoint, or remove it to start over")]
    Invalid {
        /// The checkpoint file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// It records another topic.
    #[error("checkpoint {path} is of a backfill into {found:?}, not {wanted:?}: pass another --checkpoint")]
    OtherTopic {
        /// The checkpoint file.
        path: PathBuf,
        /// The topic it records.
        found: String,
        /// This run's input topic.
        wanted: String,
    },
    /// A file changed since it was started.
    #[error("{file} changed since checkpoint {path} recorded its first {rows} rows as sent (they are not the same rows now): resuming would skip other rows. Restore the file, or pass another --checkpoint to send it whole again (the rows already sent are counted once by their event_id within dedup.horizon_s)")]
    Changed {
        /// The history file.
        file: PathBuf,
        /// The checkpoint file.
        path: PathBuf,
        /// The rows recorded as done.
        rows: u64,
    },
}

impl Checkpoint {
    /// Reads the checkpoint at `path` for a backfill into `topic` (a fresh one if the file
    /// does not exist).
    ///
    /// # Errors
    /// [`CheckpointError::Io`], [`CheckpointError::Invalid`] or [`CheckpointError::OtherTopic`].
    pub fn load(path: &Path, topic: &str) -> Result<Self, CheckpointError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    version: 1,
                    topic: topic.to_owned(),
                    files: Vec::new(),
                })
            }
            Err(source) => {
                return Err(CheckpointError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let checkpoint: Self =
            serde_json::from_str(&text).map_err(|e| CheckpointError::Invalid {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        if checkpoint.version != 1 {
            return Err(CheckpointError::Invalid {
                path: path.to_owned(),
                message: format!("version {} (this tierd writes 1)", checkpoint.version),
            });
        }
        if checkpoint.topic != topic {
            return Err(CheckpointError::OtherTopic {
                path: path.to_owned(),
                found: checkpoint.topic,
                wanted: topic.to_owned(),
            });
        }
        Ok(checkpoint)
    }

    /// The mark of `file` (canonical path), started afresh if it has none, and whether the
    /// file is done and unchanged since (then it is skipped unread).
    ///
    /// # Errors
    /// [`CheckpointError::File`] when the file cannot be read.
    pub fn mark(&mut self, file: &Path) -> Result<(usize, bool), CheckpointError> {
        let (size, head) = identify(file)?;
        if let Some(i) = self.files.iter().position(|m| m.path == file) {
            let m = &mut self.files[i];
            let unchanged = m.done && m.size == size && m.head == head;
            // Read again (changed, or not done): the rows done are checked as they are
            // skipped, and the identity is the file's as it is now.
            m.size = size;
            m.head = head;
            return Ok((i, unchanged));
        }
        self.files.push(FileMark {
            path: file.to_owned(),
            size,
            head,
            rows: 0,
            prefix: prefix_hex(&xxhash_rust::xxh3::Xxh3Default::new()),
            done: false,
        });
        Ok((self.files.len() - 1, false))
    }

    /// The error for file `mark` whose first rows are not the ones recorded.
    pub fn changed(&self, mark: usize, checkpoint: &Path) -> CheckpointError {
        CheckpointError::Changed {
            file: self.files[mark].path.clone(),
            path: checkpoint.to_owned(),
            rows: self.files[mark].rows,
        }
    }

    /// Writes the checkpoint to `path` atomically (a temporary file, synced, renamed over it).
    ///
    /// # Errors
    /// [`CheckpointError::Io`].
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let io = |source| CheckpointError::Io {
            path: path.to_owned(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let text = serde_json::to_vec_pretty(self).map_err(|e| io(e.into()))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&text).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        // The rename itself is durable once its directory is synced.
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

/// The recorded form of a prefix hash.
pub fn prefix_hex(prefix: &xxhash_rust::xxh3::Xxh3Default) -> String {
    format!("{:016x}", prefix.digest())
}

/// A file's size and the xxh3 of its first 64 KiB (hex).
fn identify(file: &Path) -> Result<(u64, String), CheckpointError> {
    let io = |source| CheckpointError::File {
        path: file.to_owned(),
        source,
    };
    let f = std::fs::File::open(file).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let mut head = Vec::with_capacity(65536);
    f.take(65536).read_to_end(&mut head).map_err(io)?;
    Ok((size, format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&head))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_keeps_its_marks_and_refuses_another_topic_or_a_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        let cp = dir.path().join("cp.json");
        let file = dir.path().join("h.csv");
        std::fs::write(&file, "a,b\n1,2\n").unwrap();
        let mut c = Checkpoint::load(&cp, "in").unwrap();
        let (i, done) = c.mark(&file).unwrap();
        assert!(!done);
        c.files[i].rows = 1;
        c.files[i].done = true;
        c.save(&cp).unwrap();

        let mut again = Checkpoint::load(&cp, "in").unwrap();
        assert_eq!(again, c);
        assert_eq!(
            again.mark(&file).unwrap(),
            (i, true),
            "done and unchanged: skipped"
        );
        std::fs::write(&file, "a,b\n1,3\n").unwrap();
        assert_eq!(
            again.mark(&file).unwrap(),
            (i, false),
            "changed: read again"
        );
        assert!(matches!(
            Checkpoint::load(&cp, "other"),
            Err(CheckpointError::OtherTopic { .. })
        ));
        let err = again.mark(&dir.path().join("missing.csv")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}", dir.path().join("missing.csv").display())),
            "{err}"
        );
        std::fs::write(&cp, "{}").unwrap();
        assert!(matches!(
            Checkpoint::load(&cp, "in"),
            Err(CheckpointError::Invalid { .. })
        ));
    }
}
