//! Where a daemon's control socket lives, so that chatd and chatctl agree.
//!
//! The default is `chatd/ID.sock` under the user's runtime directory
//! (`$XDG_RUNTIME_DIR`). Without one (the `directories` crate then gives
//! none), a per-user folder in the temporary directory is used, created
//! 0700 and checked to be the user's own and not a symlink, so another
//! local user cannot plant a socket or a link there. On Windows the socket
//! is a named pipe, `\\.\pipe\chatd-ID`, reached through the same code.
//!
//! Paths are used as file-system names (interprocess's `GenericFilePath`),
//! never the Linux abstract namespace, where file permissions do not apply.

use std::io;
use std::path::{Path, PathBuf};

use crate::ClientId;

/// Why a socket path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error(
        "socket path {path} is {len} bytes long; this platform allows at most {max}: pass a shorter --socket"
    )]
    TooLong {
        path: String,
        len: usize,
        max: usize,
    },
    #[error("{path}: {why}")]
    Unsafe { path: String, why: String },
    #[error("cannot create {path}: {source}")]
    Create { path: String, source: io::Error },
}

/// The longest path a Unix socket address holds, excluding the final NUL:
/// `sun_path` is 104 bytes on the BSDs and macOS, 108 elsewhere.
pub const MAX_SOCKET_PATH: usize = if cfg!(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd"
)) {
    103
} else {
    107
};

/// The folder holding every daemon's socket, created if needed (Unix).
pub fn socket_dir() -> Result<PathBuf, PathError> {
    #[cfg(unix)]
    if runtime_dir().is_none() {
        ensure_private_dir(&temp_base())?;
    }
    let dir = socket_dir_name();
    #[cfg(unix)]
    ensure_private_dir(&dir)?;
    Ok(dir)
}

/// Where that folder is, creating and checking nothing.
pub fn socket_dir_name() -> PathBuf {
    #[cfg(unix)]
    return runtime_dir().unwrap_or_else(temp_base).join("chatd");
    #[cfg(not(unix))]
    return PathBuf::from(r"\\.\pipe");
}

/// The default socket of daemon `id`.
pub fn default_socket(id: &ClientId) -> Result<PathBuf, PathError> {
    let path = socket_in(&socket_dir()?, id);
    check_length(&path)?;
    Ok(path)
}

/// Where the default socket of daemon `id` would be, creating and checking
/// nothing: for messages that name it, which must not leave folders behind.
pub fn default_socket_name(id: &ClientId) -> PathBuf {
    socket_in(&socket_dir_name(), id)
}

fn socket_in(dir: &Path, id: &ClientId) -> PathBuf {
    #[cfg(unix)]
    return dir.join(format!("{id}.sock"));
    #[cfg(not(unix))]
    return dir.join(format!("chatd-{id}"));
}

#[cfg(unix)]
fn runtime_dir() -> Option<PathBuf> {
    directories::BaseDirs::new().and_then(|b| b.runtime_dir().map(Path::to_path_buf))
}

/// The daemons' sockets found in the default folder, by id. The folder is
/// read, never created, and only if it is private to this user: a socket
/// anyone else could have put there is not one to talk to.
pub fn list_sockets() -> Vec<(String, PathBuf)> {
    let dir = socket_dir_name();
    #[cfg(unix)]
    if !owned_dir_mode(&dir).is_ok_and(|mode| mode & 0o077 == 0) {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            #[cfg(unix)]
            let id = name.strip_suffix(".sock")?.to_owned();
            #[cfg(not(unix))]
            let id = name.strip_prefix("chatd-")?.to_owned();
            id.parse::<ClientId>().ok()?;
            Some((id, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Refuses a socket path longer than the platform allows, instead of
/// letting it be cut short or fail with a bare "invalid argument".
pub fn check_length(path: &Path) -> Result<(), PathError> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let len = path.as_os_str().as_bytes().len();
        if len > MAX_SOCKET_PATH {
            return Err(PathError::TooLong {
                path: path.display().to_string(),
                len,
                max: MAX_SOCKET_PATH,
            });
        }
    }
    let _ = path;
    Ok(())
}

/// Where the sockets go when there is no runtime directory.
#[cfg(unix)]
fn temp_base() -> PathBuf {
    std::env::temp_dir().join(format!("chatd-{}", uid()))
}

#[cfg(unix)]
fn uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory of ours and
    // cannot fail (POSIX: "shall always be successful").
    unsafe { libc::geteuid() }
}

/// Creates `dir` with mode 0700 if missing, then checks that it is a real
/// directory (not a symlink), owned by this user, and not open to others.
#[cfg(unix)]
pub fn ensure_private_dir(dir: &Path) -> Result<(), PathError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let shown = || dir.display().to_string();
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(PathError::Create {
                path: shown(),
                source,
            });
        }
    }
    if owned_dir_mode(dir)? & 0o077 != 0 {
        // Ours, but open to others: close it (a directory we just made
        // under a permissive umask, or one made by an older version).
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| PathError::Create {
                path: shown(),
                source,
            },
        )?;
    }
    Ok(())
}

/// The mode of `dir` once it is known to be a real directory (not a
/// symlink) owned by this user.
#[cfg(unix)]
fn owned_dir_mode(dir: &Path) -> Result<u32, PathError> {
    use std::os::unix::fs::MetadataExt;
    let shown = || dir.display().to_string();
    let meta = std::fs::symlink_metadata(dir).map_err(|source| PathError::Create {
        path: shown(),
        source,
    })?;
    let unsafe_dir = |why: &str| PathError::Unsafe {
        path: shown(),
        why: why.to_owned(),
    };
    if meta.file_type().is_symlink() {
        return Err(unsafe_dir(
            "is a symbolic link; refusing to use it for private files",
        ));
    }
    if !meta.is_dir() {
        return Err(unsafe_dir("is not a directory"));
    }
    if meta.uid() != uid() {
        return Err(unsafe_dir(&format!(
            "belongs to user {} rather than you ({}); refusing to use it",
            meta.uid(),
            uid()
        )));
    }
    Ok(meta.mode())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_refused_with_the_limit() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        let err = check_length(&long).unwrap_err().to_string();
        assert!(
            err.contains("at most 107") || err.contains("at most 103"),
            "{err}"
        );
        assert!(check_length(Path::new("/tmp/ok.sock")).is_ok());
    }

    #[test]
    fn private_dirs_are_created_0700_and_symlinks_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("chat-local-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let dir = base.join("d");
        ensure_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Opened up later: closed again.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = ensure_private_dir(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
