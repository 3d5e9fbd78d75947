//! Durations written as strings (`"500ms"`, `"5s"`, `"2m"`, `"1h"`), the Kubernetes habit.

use std::{fmt, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// The longest duration any config field or flag takes: 720h (30 days). Long enough for any
/// timeout or lifetime a proxy needs, short enough that a deadline computed from it can never
/// overflow the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(720 * 3600);
/// [`MAX_DURATION`] as written in configs and in the CRD's validation rule.
pub const MAX_DURATION_TEXT: &str = "720h";

/// A duration in config: a number with a unit (`ms`, `s`, `m`, `h`), parts may be combined
/// (`"1m30s"`), at most [`MAX_DURATION`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigDuration(pub Duration);

impl ConfigDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl std::str::FromStr for ConfigDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        if trimmed.is_empty() || trimmed.bytes().all(|b| b.is_ascii_digit()) {
            // A bare number is ambiguous (seconds? milliseconds?): demand a unit.
            return Err(format!(
                "invalid duration {s:?}: expected a number with a unit, like \"5s\", \"2m\", \"500ms\""
            ));
        }
        let duration = humantime::parse_duration(trimmed)
            .map_err(|e| format!("invalid duration {s:?}: {e} (expected like \"5s\", \"2m\", \"500ms\")"))?;
        if duration > MAX_DURATION {
            return Err(format!("invalid duration {s:?}: at most {MAX_DURATION_TEXT} (30 days) is allowed"));
        }
        Ok(Self(duration))
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // humantime writes "1m 30s"; drop the spaces so the output parses back as one token.
        let text = humantime::format_duration(self.0).to_string().replace(' ', "");
        f.write_str(&text)
    }
}

impl Serialize for ConfigDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(de::Error::custom)
    }
}

impl JsonSchema for ConfigDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(ms|s|m|h))+$",
            "maxLength": 32,
            "description": "A duration: a number with a unit (ms, s, m, h), e.g. \"500ms\", \"5s\", \"2m\", \"1h30m\"; at most 720h.",
            "x-kubernetes-validations": [{
                "rule": format!("duration(self) > duration('0s') && duration(self) <= duration('{MAX_DURATION_TEXT}')"),
                "message": format!("must be greater than zero and at most {MAX_DURATION_TEXT}")
            }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_parses_units_and_combinations() {
        assert_eq!("500ms".parse::<ConfigDuration>().unwrap().get(), Duration::from_millis(500));
        assert_eq!("5s".parse::<ConfigDuration>().unwrap().get(), Duration::from_secs(5));
        assert_eq!("2m".parse::<ConfigDuration>().unwrap().get(), Duration::from_secs(120));
        assert_eq!("1h30m".parse::<ConfigDuration>().unwrap().get(), Duration::from_secs(5400));
    }

    #[test]
    fn duration_without_unit_is_rejected_with_the_value() {
        let err = "30".parse::<ConfigDuration>().unwrap_err();
        assert!(err.contains("\"30\""), "{err}");
        assert!("five seconds".parse::<ConfigDuration>().is_err());
    }

    #[test]
    fn duration_beyond_the_maximum_is_rejected_naming_the_maximum() {
        for text in ["18446744073709551615s", "10000000000000000000s", "721h", "30d1ms"] {
            let err = text.parse::<ConfigDuration>().unwrap_err();
            assert!(err.contains(text) && err.contains("at most 720h"), "{err}");
        }
        assert_eq!("720h".parse::<ConfigDuration>().unwrap().get(), MAX_DURATION);
    }

    #[test]
    fn duration_display_round_trips() {
        for text in ["500ms", "5s", "2m", "1h30m", "1m30s"] {
            let d: ConfigDuration = text.parse().unwrap();
            assert_eq!(d.to_string(), text);
            assert_eq!(d.to_string().parse::<ConfigDuration>().unwrap(), d);
        }
    }
}
