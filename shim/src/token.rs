//! The FloxHub token of a private environment, from the pod's secret mount.
//!
//! Flox documents it: the user makes a secret of `flox auth token` and mounts it read-only at
//! `/var/run/secrets/flox.dev`, file `floxhub-token`. The shim finds that mount's host source in
//! the container's spec (the directory, or the file itself when mounted with `subPath`) and
//! reads the token there, for this container's resolution only. The token is never logged: it
//! travels as [`kof_node_api::api::SecretToken`], whose `Debug` hides it.

use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::spec::Spec;

/// Where the pod mounts the secret.
pub const SECRET_DIR: &str = "/var/run/secrets/flox.dev";
/// The token's file name in it.
pub const TOKEN_FILE: &str = "floxhub-token";
/// Largest token file read.
const MAX_TOKEN_BYTES: u64 = 64 << 10;

/// Why the token could not be read.
#[derive(Debug, Error)]
pub enum TokenError {
    /// Reading the file failed.
    #[error("reading the FloxHub token {path} (the secret mounted at {SECRET_DIR})")]
    Read {
        /// The host file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is too large to be a token.
    #[error("the FloxHub token {path} (the secret mounted at {SECRET_DIR}) is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge {
        /// The host file.
        path: PathBuf,
    },
}

/// The host file holding the token, when the container mounts the secret.
pub fn token_file(spec: &Spec) -> Option<PathBuf> {
    let file_dest = format!("{SECRET_DIR}/{TOKEN_FILE}");
    spec.mount_source(&file_dest)
        .or_else(|| spec.mount_source(SECRET_DIR).map(|d| d.join(TOKEN_FILE)))
}

/// The token from `path`, trimmed; `None` when the mount holds no such file or it is empty.
pub fn read_token(path: &Path) -> Result<Option<String>, TokenError> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    Ok((!text.is_empty()).then_some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_secret_by_directory_or_sub_path() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |mounts: &str| {
            std::fs::write(
                dir.path().join("config.json"),
                format!(r#"{{"process":{{"args":["x"]}},"mounts":[{mounts}]}}"#),
            )
            .unwrap();
            Spec::read(dir.path()).unwrap()
        };
        let s = spec(
            r#"{"destination":"/var/run/secrets/flox.dev","source":"/pods/u/vol","type":"bind"}"#,
        );
        assert_eq!(
            token_file(&s),
            Some(PathBuf::from("/pods/u/vol/floxhub-token"))
        );
        let s = spec(
            r#"{"destination":"/var/run/secrets/flox.dev/floxhub-token","source":"/pods/u/tok","type":"bind"}"#,
        );
        assert_eq!(token_file(&s), Some(PathBuf::from("/pods/u/tok")));
        assert_eq!(token_file(&spec("")), None);

        let t = dir.path().join("tok");
        std::fs::write(&t, "  secret-value\n").unwrap();
        assert_eq!(read_token(&t).unwrap().as_deref(), Some("secret-value"));
        assert_eq!(read_token(&dir.path().join("absent")).unwrap(), None);
        std::fs::write(&t, vec![b'a'; 70 << 10]).unwrap();
        assert!(matches!(read_token(&t), Err(TokenError::TooLarge { .. })));
    }
}
