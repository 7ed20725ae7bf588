//! Configuration files: TOML read into a serde type, with errors that name
//! the file, the line and the key, so that a typo in a setting is a
//! one-line fix rather than a hunt.
//!
//! Both chat-server and chatd read one; their types use
//! `#[serde(deny_unknown_fields)]`, so an unknown key is an error too.

use std::path::Path;

use serde::de::DeserializeOwned;

/// Why a configuration file could not be used: one line for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Reads and parses the file at `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "cannot read the configuration {}: {e}",
            path.display()
        ))
    })?;
    parse(path, &text)
}

/// The settings an example file documents, uncommented: its `# key =
/// value` lines, so that a test can parse them and check that every key
/// is there and valid.
pub fn example_settings(text: &str) -> String {
    let is_setting = |line: &str| {
        line.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        })
    };
    text.lines()
        .filter_map(|l| l.strip_prefix("# ").filter(|l| is_setting(l)))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Parses `text`, read from `path`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().trim_end().to_owned();
        let Some(span) = e.span() else {
            return ConfigError(format!("{}: {message}", path.display()));
        };
        let start = span.start.min(text.len());
        let line_no = text[..start].matches('\n').count() + 1;
        let line = text.lines().nth(line_no - 1).unwrap_or_default();
        // The key is what stands before `=` on that line (for a table
        // header, the header).
        let key = match line.split_once('=') {
            Some((k, _)) => k.trim().trim_matches('"').to_owned(),
            None => line.trim().to_owned(),
        };
        if key.is_empty() {
            ConfigError(format!("{}, line {line_no}: {message}", path.display()))
        } else {
            ConfigError(format!(
                "{}, line {line_no}, key `{key}`: {message}",
                path.display()
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct Sample {
        port: Option<u16>,
        data_dir: Option<String>,
    }

    #[test]
    fn good_files_parse() {
        let s: Sample = parse(
            Path::new("x.toml"),
            "# comment\nport = 4000\ndata-dir = \"/d\"\n",
        )
        .unwrap();
        assert_eq!(
            s,
            Sample {
                port: Some(4000),
                data_dir: Some("/d".into())
            }
        );
    }

    #[test]
    fn unknown_keys_name_the_file_line_and_key() {
        let err = parse::<Sample>(Path::new("/etc/x.toml"), "port = 1\n\ncolour = \"red\"\n")
            .unwrap_err();
        assert!(
            err.0
                .starts_with("/etc/x.toml, line 3, key `colour`: unknown field `colour`"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_the_file_line_and_key() {
        let err = parse::<Sample>(Path::new("c.toml"), "port = \"many\"\n").unwrap_err();
        assert!(err.0.starts_with("c.toml, line 1, key `port`:"), "{err}");
        let err = parse::<Sample>(Path::new("c.toml"), "\nport = 70000\n").unwrap_err();
        assert!(err.0.starts_with("c.toml, line 2, key `port`:"), "{err}");
        let err = parse::<Sample>(Path::new("c.toml"), "port = = 1\n").unwrap_err();
        assert!(err.0.contains("line 1"), "{err}");
    }
}
