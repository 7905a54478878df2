//! Copying directory trees with their modes and owners (a pod's /dev/shm
//! into the staging dir at checkpoint, and back into the new sandbox's
//! /dev/shm at restore).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::pod::error::PodError;

/// Copies a directory tree (regular files, dirs, symlinks) into `dest`,
/// which is created (0700 until the source's mode is applied).
pub fn copy_tree_into(src: &Path, dest: &Path) -> Result<(), PodError> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dest)
        .map_err(PodError::io("create", dest))?;
    copy_contents(src, dest)
}

/// Copies what `src` holds into the existing directory `dest`, replacing
/// files of the same name. Symlinks are copied as links, never followed.
pub fn copy_contents(src: &Path, dest: &Path) -> Result<(), PodError> {
    for e in fs::read_dir(src).map_err(PodError::io("read", src))? {
        let e = e.map_err(PodError::io("read", src))?;
        let (from, to) = (e.path(), dest.join(e.file_name()));
        let meta = fs::symlink_metadata(&from).map_err(PodError::io("stat", from.clone()))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            match fs::symlink_metadata(&to) {
                Ok(m) if m.is_dir() => copy_contents(&from, &to)?,
                Ok(_) => {
                    fs::remove_file(&to).map_err(PodError::io("remove", to.clone()))?;
                    copy_tree_into(&from, &to)?;
                }
                Err(_) => copy_tree_into(&from, &to)?,
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(PodError::io("readlink", from.clone()))?;
            let _ = fs::remove_file(&to);
            std::os::unix::fs::symlink(target, &to).map_err(PodError::io("symlink", to.clone()))?;
        } else if ft.is_file() {
            // Never write through a link planted at the destination.
            if fs::symlink_metadata(&to).is_ok_and(|m| m.file_type().is_symlink()) {
                fs::remove_file(&to).map_err(PodError::io("remove", to.clone()))?;
            }
            fs::copy(&from, &to).map_err(PodError::io("copy", from.clone()))?;
        } else {
            continue;
        }
        if !ft.is_symlink() {
            let _ = fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o7777));
        }
        let _ = std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_into_existing_dir() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("d")).unwrap();
        fs::write(src.path().join("d/f"), "1").unwrap();
        fs::write(src.path().join("top"), "2").unwrap();
        std::os::unix::fs::symlink("top", src.path().join("l")).unwrap();
        let dest = tempfile::tempdir().unwrap();
        fs::write(dest.path().join("top"), "old").unwrap();
        copy_contents(src.path(), dest.path()).unwrap();
        assert_eq!(fs::read_to_string(dest.path().join("d/f")).unwrap(), "1");
        assert_eq!(fs::read_to_string(dest.path().join("top")).unwrap(), "2");
        assert_eq!(
            fs::read_link(dest.path().join("l")).unwrap(),
            Path::new("top")
        );
    }
}
