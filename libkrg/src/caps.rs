//! SSI capabilities of a process (Kerrighed's krgcapset).
//!
//! A process has an *effective* set (what applies to itself) and an
//! *inheritable* set (what its children start with). `KRG_CAPS` is read at
//! start: a list of bare names replaces the inherited set, `+name`/`-name`
//! adjust it, `all` and `none` are shorthands.

#![deny(unsafe_code)]

use std::fmt;

/// A set of SSI capabilities, as a bit mask.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Caps(pub u32);

/// Every capability with its user-visible name.
pub const NAMES: &[(&str, u32)] = &[
    ("migrate", Caps::MIGRATE.0),
    ("distant-fork", Caps::DISTANT_FORK.0),
    ("checkpoint", Caps::CHECKPOINT.0),
    ("dsm", Caps::DSM.0),
    ("streams", Caps::STREAMS.0),
    ("dfs", Caps::DFS.0),
    ("dsm-anon", Caps::DSM_ANON.0),
];

impl Caps {
    pub const NONE: Caps = Caps(0);
    pub const MIGRATE: Caps = Caps(1 << 0);
    pub const DISTANT_FORK: Caps = Caps(1 << 1);
    pub const CHECKPOINT: Caps = Caps(1 << 2);
    pub const DSM: Caps = Caps(1 << 3);
    pub const STREAMS: Caps = Caps(1 << 4);
    pub const DFS: Caps = Caps(1 << 5);
    /// `MAP_SHARED|MAP_ANONYMOUS` memory made a cluster segment, so that a
    /// child that moves to another node still shares it. Off unless asked
    /// for: each such `mmap` then costs agent calls (0.3 ms), and `mremap`
    /// or a partial `munmap` of it is not followed (docs/architecture/dsm.md).
    pub const DSM_ANON: Caps = Caps(1 << 6);
    pub const ALL: Caps = Caps((1 << 7) - 1);
    /// What a process gets when nothing says otherwise: every feature but
    /// `dsm-anon`.
    pub const DEFAULT: Caps = Caps(Caps::ALL.0 & !Caps::DSM_ANON.0);

    pub fn contains(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn from_bits(bits: u32) -> Caps {
        Caps(bits & Caps::ALL.0)
    }

    fn by_name(name: &str) -> Option<Caps> {
        match name {
            "all" => Some(Caps::ALL),
            "none" => Some(Caps::NONE),
            _ => NAMES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, b)| Caps(*b)),
        }
    }

    /// Apply a `KRG_CAPS`-style spec to `base`.
    ///
    /// Items are separated by commas or whitespace. If any item is a bare name
    /// the result starts empty (the spec is absolute); `+name` adds and
    /// `-name` removes.
    pub fn apply(base: Caps, spec: &str) -> Result<Caps, CapsError> {
        let items: Vec<&str> = spec
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .collect();
        let absolute = items
            .iter()
            .any(|s| !s.starts_with('+') && !s.starts_with('-'));
        let mut caps = if absolute { Caps::NONE } else { base };
        for item in items {
            let (op, name) = match item.as_bytes()[0] {
                b'+' => ('+', &item[1..]),
                b'-' => ('-', &item[1..]),
                _ => ('+', item),
            };
            let c = Caps::by_name(name).ok_or_else(|| CapsError(name.to_string()))?;
            if op == '+' {
                caps.0 |= c.0;
            } else {
                caps.0 &= !c.0;
            }
        }
        Ok(caps)
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = NAMES
            .iter()
            .filter(|(_, b)| self.0 & b != 0)
            .map(|(n, _)| *n)
            .collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

impl fmt::Debug for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Caps({self})")
    }
}

/// An unknown capability name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsError(pub String);

impl fmt::Display for CapsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<&str> = NAMES.iter().map(|(n, _)| *n).collect();
        write!(
            f,
            "unknown capability '{}' (known: {},all,none)",
            self.0,
            known.join(",")
        )
    }
}

impl std::error::Error for CapsError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_and_relative() {
        let c = Caps::apply(Caps::ALL, "migrate,distant-fork").unwrap();
        assert_eq!(c, Caps(Caps::MIGRATE.0 | Caps::DISTANT_FORK.0));
        let c = Caps::apply(Caps::ALL, "-dfs").unwrap();
        assert!(!c.contains(Caps::DFS));
        assert!(c.contains(Caps::MIGRATE));
        let c = Caps::apply(Caps::NONE, "+dsm +streams").unwrap();
        assert_eq!(c, Caps(Caps::DSM.0 | Caps::STREAMS.0));
        let c = Caps::apply(Caps::MIGRATE, "migrate,distant-fork,dsm,-dfs").unwrap();
        assert_eq!(c.to_string(), "migrate,distant-fork,dsm");
        assert_eq!(Caps::apply(Caps::ALL, "none").unwrap(), Caps::NONE);
        assert_eq!(Caps::apply(Caps::ALL, "").unwrap(), Caps::ALL);
        assert!(!Caps::DEFAULT.contains(Caps::DSM_ANON));
        let c = Caps::apply(Caps::DEFAULT, "+dsm-anon").unwrap();
        assert!(c.contains(Caps::DSM_ANON) && c.contains(Caps::MIGRATE));
    }

    #[test]
    fn unknown_name_is_an_error() {
        let e = Caps::apply(Caps::ALL, "migrate,teleport").unwrap_err();
        assert!(e.to_string().contains("teleport"));
    }
}
