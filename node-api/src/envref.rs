//! Environment references as a pod names them: `owner/name` (the live generation) or
//! `owner/name:N` (generation `N` pinned), from the `flox.dev/environment` annotation.
//!
//! The owner becomes a path component of the floxmeta mirror and a URL segment, and the name
//! becomes a git branch name, so both are validated strictly here, before anything uses them.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Longest owner or environment name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// A FloxHub environment, optionally pinned to one generation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvRef {
    /// FloxHub owner (user or organisation).
    pub owner: String,
    /// Environment name (a branch of the owner's floxmeta repository).
    pub name: String,
    /// The pinned generation, or `None` for the live one.
    pub generation: Option<u64>,
}

/// What is wrong with one part of a reference.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameProblem {
    /// Nothing there.
    #[error("it is empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`].
    #[error("it is {0} bytes long, more than {MAX_NAME_LEN}")]
    TooLong(usize),
    /// Starts with `.` or `-`.
    #[error("it starts with {0:?}")]
    BadStart(char),
    /// Holds a character other than ASCII alphanumerics, `-`, `_`, `.`.
    #[error("it contains {0:?} (allowed: ASCII letters, digits, '-', '_', '.')")]
    BadChar(char),
    /// Holds `..`, ends with `.` or `.lock` (not a valid git branch name).
    #[error("it contains '..' or ends with '.' or '.lock'")]
    BadGitName,
}

/// What is wrong with the `:N` part.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GenerationProblem {
    /// `owner/name:` with nothing after the colon.
    #[error("it is empty")]
    Empty,
    /// Something other than decimal digits (signs, spaces, letters).
    #[error("it is not a decimal number")]
    NotDecimal,
    /// `0`, or leading zeros.
    #[error("it must be a positive number without leading zeros")]
    NotPositive,
    /// Does not fit 64 bits.
    #[error("it is too large")]
    TooLarge,
}

/// Why a reference was refused; each variant names the whole input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnvRefError {
    /// No `/` between owner and name, or more than one.
    #[error(
        "invalid environment reference {input:?}: expected \"owner/name\" or \"owner/name:N\""
    )]
    Shape {
        /// The reference as given.
        input: String,
    },
    /// The owner part is invalid.
    #[error("invalid environment reference {input:?}: bad owner")]
    Owner {
        /// The reference as given.
        input: String,
        /// Why.
        #[source]
        problem: NameProblem,
    },
    /// The name part is invalid.
    #[error("invalid environment reference {input:?}: bad environment name")]
    Name {
        /// The reference as given.
        input: String,
        /// Why.
        #[source]
        problem: NameProblem,
    },
    /// The generation part is invalid.
    #[error("invalid environment reference {input:?}: bad generation")]
    Generation {
        /// The reference as given.
        input: String,
        /// Why.
        #[source]
        problem: GenerationProblem,
    },
}

/// Checks an owner or environment name against FloxHub's naming rules (and git's branch rules).
pub fn check_name(s: &str) -> Result<(), NameProblem> {
    let first = s.chars().next().ok_or(NameProblem::Empty)?;
    if s.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong(s.len()));
    }
    if first == '.' || first == '-' {
        return Err(NameProblem::BadStart(first));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(NameProblem::BadChar(c));
    }
    if s.contains("..") || s.ends_with('.') || s.ends_with(".lock") {
        return Err(NameProblem::BadGitName);
    }
    Ok(())
}

/// Parses a generation number: a positive decimal without sign or leading zeros.
pub fn parse_generation(s: &str) -> Result<u64, GenerationProblem> {
    if s.is_empty() {
        return Err(GenerationProblem::Empty);
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(GenerationProblem::NotDecimal);
    }
    if s.starts_with('0') {
        return Err(GenerationProblem::NotPositive);
    }
    s.parse::<u64>().map_err(|_| GenerationProblem::TooLarge)
}

impl EnvRef {
    /// Parses `owner/name` or `owner/name:N`.
    pub fn parse(input: &str) -> Result<Self, EnvRefError> {
        let shape = || EnvRefError::Shape {
            input: input.to_string(),
        };
        let (owner, rest) = input.split_once('/').ok_or_else(shape)?;
        if rest.contains('/') {
            return Err(shape());
        }
        let (name, generation) = match rest.split_once(':') {
            Some((name, g)) => (name, Some(g)),
            None => (rest, None),
        };
        check_name(owner).map_err(|problem| EnvRefError::Owner {
            input: input.to_string(),
            problem,
        })?;
        check_name(name).map_err(|problem| EnvRefError::Name {
            input: input.to_string(),
            problem,
        })?;
        let generation = generation
            .map(parse_generation)
            .transpose()
            .map_err(|problem| EnvRefError::Generation {
                input: input.to_string(),
                problem,
            })?;
        Ok(EnvRef {
            owner: owner.to_string(),
            name: name.to_string(),
            generation,
        })
    }

    /// `owner/name`, without the generation.
    pub fn env_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

impl FromStr for EnvRef {
    type Err = EnvRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EnvRef::parse(s)
    }
}

impl fmt::Display for EnvRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)?;
        if let Some(g) = self.generation {
            write!(f, ":{g}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_live_and_pinned() {
        let r = EnvRef::parse("limeytexan/echoip").unwrap();
        assert_eq!(r.owner, "limeytexan");
        assert_eq!(r.name, "echoip");
        assert_eq!(r.generation, None);
        assert_eq!(r.to_string(), "limeytexan/echoip");

        let r = EnvRef::parse("my-org_1/env.v2:17").unwrap();
        assert_eq!(r.owner, "my-org_1");
        assert_eq!(r.name, "env.v2");
        assert_eq!(r.generation, Some(17));
        assert_eq!(r.to_string(), "my-org_1/env.v2:17");
        assert_eq!(r.env_name(), "my-org_1/env.v2");
        assert_eq!("my-org_1/env.v2:17".parse::<EnvRef>().unwrap(), r);
    }

    #[test]
    fn refuses_bad_shapes() {
        for bad in ["", "owner", "a/b/c", "a/b:1/c", "//"] {
            assert!(
                matches!(EnvRef::parse(bad), Err(EnvRefError::Shape { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refuses_bad_owner_and_name() {
        let cases: &[(&str, NameProblem)] = &[
            ("/env", NameProblem::Empty),
            (".hidden/env", NameProblem::BadStart('.')),
            ("-x/env", NameProblem::BadStart('-')),
            ("o wner/env", NameProblem::BadChar(' ')),
            ("ownér/env", NameProblem::BadChar('é')),
            ("a..b/env", NameProblem::BadGitName),
        ];
        for (input, problem) in cases {
            assert_eq!(
                EnvRef::parse(input).unwrap_err(),
                EnvRefError::Owner {
                    input: input.to_string(),
                    problem: problem.clone()
                }
            );
        }
        let cases: &[(&str, NameProblem)] = &[
            ("owner/", NameProblem::Empty),
            ("owner/:3", NameProblem::Empty),
            ("owner/.env", NameProblem::BadStart('.')),
            ("owner/e\nv", NameProblem::BadChar('\n')),
            ("owner/env;rm", NameProblem::BadChar(';')),
            ("owner/env.lock", NameProblem::BadGitName),
            ("owner/env.", NameProblem::BadGitName),
        ];
        for (input, problem) in cases {
            assert_eq!(
                EnvRef::parse(input).unwrap_err(),
                EnvRefError::Name {
                    input: input.to_string(),
                    problem: problem.clone()
                }
            );
        }
        let long = format!("o/{}", "n".repeat(MAX_NAME_LEN + 1));
        assert_eq!(
            EnvRef::parse(&long).unwrap_err(),
            EnvRefError::Name {
                input: long.clone(),
                problem: NameProblem::TooLong(MAX_NAME_LEN + 1)
            }
        );
        assert!(EnvRef::parse(&format!("o/{}", "n".repeat(MAX_NAME_LEN))).is_ok());
    }

    #[test]
    fn refuses_bad_generations() {
        let cases: &[(&str, GenerationProblem)] = &[
            ("o/n:", GenerationProblem::Empty),
            ("o/n:+1", GenerationProblem::NotDecimal),
            ("o/n:-1", GenerationProblem::NotDecimal),
            ("o/n: 1", GenerationProblem::NotDecimal),
            ("o/n:1 ", GenerationProblem::NotDecimal),
            ("o/n:0x1", GenerationProblem::NotDecimal),
            ("o/n:1:2", GenerationProblem::NotDecimal),
            ("o/n:0", GenerationProblem::NotPositive),
            ("o/n:007", GenerationProblem::NotPositive),
            ("o/n:99999999999999999999999", GenerationProblem::TooLarge),
        ];
        for (input, problem) in cases {
            let err = EnvRef::parse(input).unwrap_err();
            assert_eq!(
                err,
                EnvRefError::Generation {
                    input: input.to_string(),
                    problem: problem.clone()
                }
            );
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
        }
    }
}
