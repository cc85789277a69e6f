//! Topic matching.
//!
//! Topics are `.`-separated, non-empty segments (`sensors.arm.temp`), at most
//! [`MAX_TOPIC_LEN`] bytes. A pattern is a topic whose segments may also be wildcards:
//!
//! * `*` matches exactly one segment: `sensors.*.temp` matches `sensors.arm.temp`, not
//!   `sensors.arm.left.temp`;
//! * `**`, allowed only as the last segment, matches **one or more** remaining segments (as
//!   NATS' `>`): `logs.**` matches `logs.app` and `logs.app.db` but not `logs`; `**` alone matches
//!   every topic.
//!
//! Topics themselves may not contain the segments `*` or `**`.

/// Longest topic or pattern, in bytes.
pub const MAX_TOPIC_LEN: usize = 1024;

/// Why a topic or pattern is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The topic or pattern is empty.
    #[error("empty topic")]
    Empty,
    /// Two dots in a row, or a leading or trailing dot.
    #[error("empty topic segment")]
    EmptySegment,
    /// `**` somewhere other than the last segment.
    #[error("`**` is only allowed as the last segment")]
    MultiWildcardNotLast,
    /// A wildcard segment in a topic (only patterns may have them).
    #[error("wildcards are not allowed in a topic")]
    WildcardInTopic,
    /// Longer than [`MAX_TOPIC_LEN`].
    #[error("topic of {len} bytes exceeds {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong { len: s.len(), max: MAX_TOPIC_LEN });
    }
    if s.split('.').any(str::is_empty) {
        return Err(TopicError::EmptySegment);
    }
    Ok(())
}

/// Checks a topic (no wildcards).
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if topic.split('.').any(|s| s == "*" || s == "**") {
        return Err(TopicError::WildcardInTopic);
    }
    Ok(())
}

/// Checks a pattern.
pub fn validate_pattern(pattern: &str) -> Result<(), TopicError> {
    check_common(pattern)?;
    let mut segs = pattern.split('.').peekable();
    while let Some(s) = segs.next() {
        if s == "**" && segs.peek().is_some() {
            return Err(TopicError::MultiWildcardNotLast);
        }
    }
    Ok(())
}

/// True when `topic` matches `pattern`; false for an invalid topic or pattern. Allocates nothing.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    if validate_pattern(pattern).is_err() || validate_topic(topic).is_err() {
        return false;
    }
    matches_valid(pattern, topic)
}

fn matches_valid(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('.');
    let mut t = topic.split('.');
    loop {
        match (p.next(), t.next()) {
            (Some("**"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(ps), Some(ts)) => {
                if ps != ts {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A validated pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicPattern {
    pattern: String,
}

impl TopicPattern {
    /// Validates and wraps a pattern.
    pub fn parse(pattern: &str) -> Result<Self, TopicError> {
        validate_pattern(pattern)?;
        Ok(TopicPattern { pattern: pattern.to_string() })
    }

    /// True when `topic` (a valid topic) matches.
    pub fn matches(&self, topic: &str) -> bool {
        validate_topic(topic).is_ok() && matches_valid(&self.pattern, topic)
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn documented_examples() {
        assert!(topic_matches("sensors.*.temp", "sensors.arm.temp"));
        assert!(!topic_matches("sensors.*.temp", "sensors.arm.left.temp"));
        assert!(topic_matches("logs.**", "logs.app"));
        assert!(topic_matches("logs.**", "logs.app.db"));
        assert!(!topic_matches("logs.**", "logs"));
        assert!(topic_matches("**", "a"));
        assert!(topic_matches("a.b", "a.b"));
        assert!(!topic_matches("a.b", "a.b.c"));
        assert!(!topic_matches("a.b.c", "a.b"));
        assert!(topic_matches("*", "x"));
        assert!(!topic_matches("*", "x.y"));
    }

    #[test]
    fn invalid_inputs() {
        assert_eq!(validate_pattern(""), Err(TopicError::Empty));
        assert_eq!(validate_pattern("a..b"), Err(TopicError::EmptySegment));
        assert_eq!(validate_pattern(".a"), Err(TopicError::EmptySegment));
        assert_eq!(validate_pattern("a.**.b"), Err(TopicError::MultiWildcardNotLast));
        assert_eq!(validate_topic("a.*"), Err(TopicError::WildcardInTopic));
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            validate_topic(&long),
            Err(TopicError::TooLong { len: MAX_TOPIC_LEN + 1, max: MAX_TOPIC_LEN })
        );
        assert!(validate_topic(&"a".repeat(MAX_TOPIC_LEN)).is_ok());
        assert!(!topic_matches("a.**.b", "a.x.b"));
        assert!(!topic_matches("**", "a..b"));
    }

    /// Reference matcher, written recursively over segment vectors.
    fn reference(p: &[&str], t: &[&str]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(&"**"), Some(_)) => p.len() == 1,
            (Some(&"*"), Some(_)) => reference(&p[1..], &t[1..]),
            (Some(a), Some(b)) => a == b && reference(&p[1..], &t[1..]),
            _ => false,
        }
    }

    fn seg() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from)
    }
    fn pseg() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "c", "*", "**"]).prop_map(String::from)
    }

    proptest! {
        #[test]
        fn agrees_with_reference(p in prop::collection::vec(pseg(), 1..5), t in prop::collection::vec(seg(), 1..5)) {
            let ps = p.join(".");
            let ts = t.join(".");
            let valid = validate_pattern(&ps).is_ok();
            let pr: Vec<&str> = p.iter().map(String::as_str).collect();
            let tr: Vec<&str> = t.iter().map(String::as_str).collect();
            prop_assert_eq!(topic_matches(&ps, &ts), valid && reference(&pr, &tr));
            if let Ok(tp) = TopicPattern::parse(&ps) {
                prop_assert_eq!(tp.matches(&ts), reference(&pr, &tr));
            }
        }

        #[test]
        fn double_star_matches_every_topic(t in prop::collection::vec(seg(), 1..6)) {
            prop_assert!(topic_matches("**", &t.join(".")));
        }

        #[test]
        fn literal_matches_only_itself(p in prop::collection::vec(seg(), 1..4), t in prop::collection::vec(seg(), 1..4)) {
            let (ps, ts) = (p.join("."), t.join("."));
            prop_assert_eq!(topic_matches(&ps, &ts), ps == ts);
        }
    }
}
