//! Checks shared by the fuzz targets (included with `#[path]`; not a target itself).

/// A layer-index path is relative, with no empty, `.` or `..` component.
pub fn assert_clean(path: &[u8]) {
    if path.is_empty() {
        return;
    }
    for comp in path.split(|&b| b == b'/') {
        assert!(
            !matches!(comp, b"" | b"." | b".."),
            "unclean path {:?}",
            String::from_utf8_lossy(path)
        );
    }
}
