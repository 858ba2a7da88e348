//! How an error becomes the one line a kof binary prints or a log and an API failure carry.
//!
//! Every kof error describes its own layer in its `Display` and returns its cause from
//! `source()`; [`chain`] joins the error with every cause below it, so the line names the
//! thing that failed at each level without any level repeating another.

use std::error::Error;

/// `err` and its sources, outermost first, joined with `": "`. A layer whose text is already
/// the end of the line so far (a wrapper that repeats its cause) is not written twice.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);
    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn layers_are_joined_outermost_first() {
        let e = Layer(
            "preparing kof/python",
            Some(Box::new(Layer(
                "fetching /nix/store/x-y",
                Some(Box::new(Layer("connection refused", None))),
            ))),
        );
        assert_eq!(
            chain(&e),
            "preparing kof/python: fetching /nix/store/x-y: connection refused"
        );
        assert_eq!(chain(&Layer("alone", None)), "alone");
    }
}
