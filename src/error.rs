//! How errors are shown. Every error type in this crate follows one convention (the one the
//! Rust error-handling project recommends): a variant's message describes *its* level only,
//! and the error it wraps is returned by [`std::error::Error::source`], never also formatted
//! into the message. [`Chain`] prints the whole story on one line, `outer: cause: root cause`;
//! use it wherever an error is logged or shown, so no cause is lost and none is printed twice.

use std::error::Error;
use std::fmt;

/// An error and its causes, `: `-separated.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("layer {0}")]
    struct Outer(&'static str, #[source] std::io::Error);

    #[test]
    fn each_level_once() {
        let e = Outer("sha256:ab", std::io::Error::other("disk full"));
        assert_eq!(Chain(&e).to_string(), "layer sha256:ab: disk full");
        assert_eq!(e.to_string(), "layer sha256:ab");
    }
}
