//! The ServiceAccount token a stream authenticates with. It is read from its file for every new
//! stream, never cached: a projected token is rewritten by the kubelet before it expires, and
//! the next stream must carry the current one.

use std::path::Path;

use tokio::io::AsyncReadExt;
use tonic::metadata::AsciiMetadataValue;

/// The most a token file may hold (a projected token is about 1 KiB).
const MAX_TOKEN_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {path} {why}")]
    Invalid { path: String, why: &'static str },
}

/// The `authorization` metadata value for the token in `path`: `Bearer <token>`, marked
/// sensitive so that it never shows in debug output.
pub async fn bearer(path: &Path) -> Result<AsciiMetadataValue, TokenError> {
    let display = || path.display().to_string();
    let invalid = |why| TokenError::Invalid { path: display(), why };
    let mut bytes = Vec::new();
    let read = async {
        let file = tokio::fs::File::open(path).await?;
        file.take(MAX_TOKEN_BYTES as u64 + 1).read_to_end(&mut bytes).await
    };
    read.await.map_err(|source| TokenError::Read { path: display(), source })?;
    if bytes.len() > MAX_TOKEN_BYTES {
        return Err(invalid("is larger than 64 KiB"));
    }
    let token = std::str::from_utf8(&bytes).map_err(|_| invalid("is not text"))?.trim();
    if token.is_empty() {
        return Err(invalid("is empty"));
    }
    let mut value: AsciiMetadataValue =
        format!("Bearer {token}").parse().map_err(|_| invalid("holds characters a token cannot have"))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn bearer_of(name: &str, contents: &[u8]) -> Result<AsciiMetadataValue, TokenError> {
        let path = std::env::temp_dir().join(format!("l4proxy-token-{name}-{}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        let value = bearer(&path).await;
        std::fs::remove_file(&path).unwrap();
        value
    }

    #[tokio::test]
    async fn token_is_sent_as_a_bearer_without_its_trailing_newline() {
        let value = bearer_of("newline", b"eyJhbGciOi.abc.def\n").await.unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer eyJhbGciOi.abc.def");
        assert!(value.is_sensitive());
    }

    #[tokio::test]
    async fn empty_oversized_or_binary_token_files_are_refused_naming_why() {
        let empty = bearer_of("empty", b" \n").await.unwrap_err().to_string();
        assert!(empty.ends_with("is empty"), "{empty}");
        let huge = bearer_of("huge", &vec![b'a'; MAX_TOKEN_BYTES + 1]).await.unwrap_err().to_string();
        assert!(huge.ends_with("larger than 64 KiB"), "{huge}");
        let control = bearer_of("control", b"abc\x01def").await.unwrap_err().to_string();
        assert!(control.ends_with("characters a token cannot have"), "{control}");
    }

    #[tokio::test]
    async fn a_missing_token_file_is_a_read_error_naming_the_path() {
        let error = bearer(Path::new("/nonexistent/token")).await.unwrap_err().to_string();
        assert!(error.starts_with("cannot read the token file /nonexistent/token"), "{error}");
    }
}
