//! oslo-style API versions (`X.Y` or `X.Y.Z`) and their compatibility rule.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// An RPC API version: `major.minor[.revision]`.
///
/// ```
/// use warren::Version;
///
/// let implemented: Version = "1.3".parse()?;
/// assert!(implemented.can_serve(&"1.0".parse()?));
/// assert!(implemented.can_serve(&"1.3".parse()?));
/// assert!(!implemented.can_serve(&"1.4".parse()?));
/// assert!(!implemented.can_serve(&"2.0".parse()?));
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    major: u64,
    minor: u64,
    revision: u64,
    text: String,
}

impl Version {
    /// Parses `X.Y` or `X.Y.Z` (integers); anything else is [`Error::InvalidVersion`].
    pub fn parse(text: &str) -> Result<Version> {
        let bad = || Error::InvalidVersion {
            version: text.to_string(),
        };
        let parts: Vec<&str> = text.split('.').collect();
        if parts.len() < 2 || parts.len() > 3 {
            return Err(bad());
        }
        let num = |p: &str| {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                Err(bad())
            } else {
                p.parse::<u64>().map_err(|_| bad())
            }
        };
        Ok(Version {
            major: num(parts[0])?,
            minor: num(parts[1])?,
            revision: match parts.get(2) {
                Some(r) => num(r)?,
                None => 0,
            },
            text: text.to_string(),
        })
    }

    /// The version `major.minor`.
    pub fn new(major: u64, minor: u64) -> Version {
        Version {
            major,
            minor,
            revision: 0,
            text: format!("{major}.{minor}"),
        }
    }

    /// The version `1.0`, what oslo assumes when a request or an endpoint names none.
    pub fn one() -> Version {
        Version::new(1, 0)
    }

    /// oslo's `version_is_compatible(self, requested)`: same major, and the requested
    /// minor (then revision) not above this one.
    pub fn can_serve(&self, requested: &Version) -> bool {
        requested.major == self.major
            && (requested.minor, requested.revision) <= (self.minor, self.revision)
    }

    /// The version as it was written (`"1.3"`, `"2.0.1"`).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Version {
    type Err = Error;
    fn from_str(s: &str) -> Result<Version> {
        Version::parse(s)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn oslo_compatibility_rules() {
        assert!(v("1.3").can_serve(&v("1.0")));
        assert!(v("1.3").can_serve(&v("1.3")));
        assert!(!v("1.3").can_serve(&v("1.4")));
        assert!(!v("1.3").can_serve(&v("2.1")));
        assert!(!v("2.0").can_serve(&v("1.0")));
        assert!(v("1.3.2").can_serve(&v("1.3.1")));
        assert!(!v("1.3").can_serve(&v("1.3.1")));
        assert!(v("1.4").can_serve(&v("1.3.9")));
    }

    #[test]
    fn invalid_versions() {
        // "1.+2" and "1.2.+3": Rust's integer parser would take "+2", Python's oslo would not.
        for bad in [
            "", "1", "1.", "a.b", "1.2.3.4", "-1.0", "1.x", " 1.0", "1.+2", "1.2.+3", "+1.0",
        ] {
            assert!(
                matches!(Version::parse(bad), Err(Error::InvalidVersion { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_version_reads_as_it_was_written() {
        for text in ["1.3", "2.0.1", "10.02"] {
            assert_eq!(v(text).as_str(), text);
            assert_eq!(v(text).to_string(), text);
        }
        assert_eq!(Version::new(4, 2).as_str(), "4.2");
        assert_eq!(Version::one().as_str(), "1.0");
    }
}
