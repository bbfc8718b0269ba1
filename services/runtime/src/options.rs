//! The command line every service shares, and where its listen address
//! comes from.
//!
//! Flags: `--listen ADDR`, `--data-dir DIR`, `--threads N` (clamped to
//! 1..=64), `--report-interval-ms MS` and `--refresh-interval-ms MS` (at
//! least 10), `-h`/`--help`; `--flag=value` works as well as `--flag
//! value`. A service adds its own value flags through
//! [`CommonOptions::parse_with`]. Errors carry the service's usage text
//! where the user needs it (missing value, unknown argument).
//!
//! Limits: every extra flag takes exactly one value; there are no boolean
//! flags besides `--help`; the last occurrence of a flag wins.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// A bad command line; the text is what the user should read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The flags every service takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommonOptions {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--data-dir` (default: the working directory).
    pub data_dir: Option<PathBuf>,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--report-interval-ms`.
    pub report_ms: Option<u64>,
    /// `--refresh-interval-ms`.
    pub refresh_ms: Option<u64>,
}

/// Parses `value` of `flag` as a number of milliseconds, threads, ...
pub fn number(flag: &str, value: &str) -> Result<u64, UsageError> {
    value
        .parse::<u64>()
        .map_err(|_| UsageError(format!("{flag}: not a number: {value}")))
}

impl CommonOptions {
    /// Parses `args` (without the program name). `Ok(None)` for `--help`.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        usage: &str,
    ) -> Result<Option<CommonOptions>, UsageError> {
        Self::parse_with(args, usage, &[], |_, _| Ok(()))
    }

    /// Parses `args` (without the program name); `Ok(None)` for `--help`.
    /// A flag in `extra_flags` takes a value, handed to `on_extra(flag,
    /// value)` in command-line order; its error stops the parse.
    pub fn parse_with(
        args: impl IntoIterator<Item = String>,
        usage: &str,
        extra_flags: &[&str],
        mut on_extra: impl FnMut(&str, String) -> Result<(), UsageError>,
    ) -> Result<Option<CommonOptions>, UsageError> {
        let mut o = CommonOptions::default();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            if flag == "-h" || flag == "--help" {
                return Ok(None);
            }
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or_else(|| UsageError(format!("{flag} needs a value\n{usage}")))
            };
            match flag.as_str() {
                "--listen" => o.listen = Some(value()?),
                "--data-dir" => o.data_dir = Some(PathBuf::from(value()?)),
                "--threads" => {
                    let n = number(&flag, &value()?)?;
                    o.threads = Some(usize::try_from(n.clamp(1, 64)).unwrap_or(1));
                }
                "--report-interval-ms" => o.report_ms = Some(number(&flag, &value()?)?.max(10)),
                "--refresh-interval-ms" => o.refresh_ms = Some(number(&flag, &value()?)?.max(10)),
                f if extra_flags.contains(&f) => {
                    let v = value()?;
                    on_extra(&flag, v)?;
                }
                _ => return Err(UsageError(format!("unknown argument {arg}\n{usage}"))),
            }
        }
        Ok(Some(o))
    }

    /// `--data-dir`, else the working directory.
    pub fn data_dir_or_cwd(&self) -> std::io::Result<PathBuf> {
        match &self.data_dir {
            Some(d) => Ok(d.clone()),
            None => std::env::current_dir(),
        }
    }
}

/// The listen address: `flag` (`--listen`), else the env var `env_var`,
/// else the config value `listen`, else `default`.
pub fn listen_address(
    flag: Option<String>,
    env_var: &str,
    config: &BTreeMap<String, String>,
    default: &str,
) -> String {
    flag.or_else(|| std::env::var(env_var).ok())
        .or_else(|| config.get("listen").cloned())
        .unwrap_or_else(|| default.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const USAGE: &str = "usage: test-service [--listen ADDR]";

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn parse(a: &[&str]) -> Result<Option<CommonOptions>, UsageError> {
        CommonOptions::parse(args(a), USAGE)
    }

    #[test]
    fn every_common_flag_in_both_forms() {
        let o = parse(&[
            "--listen",
            "0.0.0.0:1",
            "--data-dir=/tmp/d",
            "--threads",
            "3",
            "--report-interval-ms=250",
            "--refresh-interval-ms",
            "500",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            o,
            CommonOptions {
                listen: Some("0.0.0.0:1".into()),
                data_dir: Some(PathBuf::from("/tmp/d")),
                threads: Some(3),
                report_ms: Some(250),
                refresh_ms: Some(500),
            }
        );
        assert_eq!(parse(&[]).unwrap().unwrap(), CommonOptions::default());
    }

    #[test]
    fn a_value_may_hold_an_equals_sign() {
        let o = parse(&["--data-dir=/a=b"]).unwrap().unwrap();
        assert_eq!(o.data_dir, Some(PathBuf::from("/a=b")));
    }

    #[test]
    fn numbers_are_clamped() {
        let o = parse(&[
            "--threads=0",
            "--report-interval-ms=1",
            "--refresh-interval-ms=0",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (o.threads, o.report_ms, o.refresh_ms),
            (Some(1), Some(10), Some(10))
        );
        let o = parse(&["--threads", "1000"]).unwrap().unwrap();
        assert_eq!(o.threads, Some(64));
    }

    #[test]
    fn help_wins_over_everything_before_it() {
        assert_eq!(parse(&["--listen=x", "--help"]).unwrap(), None);
        assert_eq!(parse(&["-h"]).unwrap(), None);
    }

    #[test]
    fn errors_name_the_flag_and_show_the_usage_where_needed() {
        assert_eq!(
            parse(&["--listen"]).unwrap_err().0,
            format!("--listen needs a value\n{USAGE}")
        );
        assert_eq!(
            parse(&["--threads", "many"]).unwrap_err().0,
            "--threads: not a number: many"
        );
        assert_eq!(
            parse(&["--report-interval-ms=-5"]).unwrap_err().0,
            "--report-interval-ms: not a number: -5"
        );
        assert_eq!(
            parse(&["--bogus=1"]).unwrap_err().0,
            format!("unknown argument --bogus=1\n{USAGE}")
        );
        assert_eq!(
            parse(&["stray"]).unwrap_err().0,
            format!("unknown argument stray\n{USAGE}")
        );
    }

    #[test]
    fn extra_flags_go_to_the_callback_in_order() {
        let mut seen = Vec::new();
        let o = CommonOptions::parse_with(
            args(&["--backup-interval-ms", "7", "--threads=2", "--name=x"]),
            USAGE,
            &["--backup-interval-ms", "--name"],
            |flag, value| {
                seen.push((flag.to_string(), value));
                Ok(())
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(o.threads, Some(2));
        assert_eq!(
            seen,
            [
                ("--backup-interval-ms".to_string(), "7".to_string()),
                ("--name".to_string(), "x".to_string())
            ]
        );
    }

    #[test]
    fn an_extra_flag_error_stops_the_parse_before_later_arguments() {
        let err = CommonOptions::parse_with(
            args(&["--every=soon", "--bogus"]),
            USAGE,
            &["--every"],
            |flag, value| number(flag, &value).map(|_| ()),
        )
        .unwrap_err();
        assert_eq!(err.0, "--every: not a number: soon");
        let err = CommonOptions::parse_with(args(&["--every"]), USAGE, &["--every"], |_, _| Ok(()))
            .unwrap_err();
        assert_eq!(err.0, format!("--every needs a value\n{USAGE}"));
        // Not declared: unknown, even if the callback would accept it.
        let err =
            CommonOptions::parse_with(args(&["--other=1"]), USAGE, &["--every"], |_, _| Ok(()))
                .unwrap_err();
        assert_eq!(err.0, format!("unknown argument --other=1\n{USAGE}"));
    }

    #[test]
    fn data_dir_defaults_to_the_working_directory() {
        let o = CommonOptions::default();
        assert_eq!(
            o.data_dir_or_cwd().unwrap(),
            std::env::current_dir().unwrap()
        );
        let o = parse(&["--data-dir=/srv/x"]).unwrap().unwrap();
        assert_eq!(o.data_dir_or_cwd().unwrap(), PathBuf::from("/srv/x"));
    }

    #[test]
    fn listen_address_precedence_flag_env_config_default() {
        // A variable name only this test uses, so parallel tests do not race.
        let var = "AEREKOS_RUNTIME_TEST_LISTEN_PRECEDENCE";
        let mut config = BTreeMap::new();
        std::env::remove_var(var);
        assert_eq!(listen_address(None, var, &config, "d:1"), "d:1");
        config.insert("listen".to_string(), "c:2".to_string());
        assert_eq!(listen_address(None, var, &config, "d:1"), "c:2");
        std::env::set_var(var, "e:3");
        assert_eq!(listen_address(None, var, &config, "d:1"), "e:3");
        assert_eq!(
            listen_address(Some("f:4".into()), var, &config, "d:1"),
            "f:4"
        );
        std::env::remove_var(var);
    }
}
