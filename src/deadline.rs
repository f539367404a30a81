//! A job's time limits: `deadline`, an absolute wall-clock time (an RFC 3339 timestamp or
//! milliseconds since the Unix epoch), parsed at the edge into a [`Deadline`]; and `timeout_ms`,
//! the longest it may wait before it starts, counted from its publish. A job past either is
//! answered `timeout` without compute ([`late`]): at intake, and again just before its batch goes
//! to the engine. A generation that runs past its deadline stops with `finish_reason: "deadline"`
//! (the engine's scheduler checks once per decode step).

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rmpv::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::{excerpt, ErrorCode, JobError};

/// Milliseconds below this (1973-03-03) are almost surely seconds sent as milliseconds: such a
/// deadline would have passed for decades, so every job carrying it would time out.
const EARLIEST_MS: u64 = 100_000_000_000;

/// An absolute time after which a job's result is worthless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(SystemTime);

impl Deadline {
    /// Reads the `deadline` field: an RFC 3339 string (`2026-11-26T12:00:00Z`, any offset) or a
    /// non-negative integer of milliseconds since the Unix epoch. The error names the field.
    pub fn parse(v: &Value) -> Result<Deadline, String> {
        const EXPECTED: &str = "deadline: expected an RFC 3339 timestamp string (e.g. 2026-11-26T12:00:00Z) or an integer of milliseconds since the Unix epoch";
        let at = match v {
            Value::String(s) => {
                let s = s.as_str().ok_or("deadline: not valid UTF-8")?;
                let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("deadline: '{}' is not an RFC 3339 timestamp ({e})", excerpt(s)))?;
                // Whole seconds, not nanoseconds: u64 nanoseconds end in 2554, RFC 3339 in 9999.
                let secs = u64::try_from(t.unix_timestamp()).map_err(|_| format!("deadline: '{}' is before 1970", excerpt(s)))?;
                UNIX_EPOCH + Duration::new(secs, t.nanosecond())
            }
            Value::Integer(i) => {
                let ms = i.as_u64().ok_or(EXPECTED)?;
                if ms < EARLIEST_MS {
                    return Err(format!("deadline: {ms} ms since the epoch is before 1973; seconds? (the integer form is milliseconds)"));
                }
                UNIX_EPOCH.checked_add(Duration::from_millis(ms)).ok_or_else(|| format!("deadline: {ms} ms since the epoch is out of range"))?
            }
            _ => return Err(EXPECTED.into()),
        };
        Ok(Deadline(at))
    }

    /// Milliseconds since the Unix epoch (its integer wire form).
    pub fn unix_ms(self) -> u64 {
        self.0.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
    }

    /// The deadline `ms` milliseconds after the Unix epoch (`None` if out of range).
    pub fn from_unix_ms(ms: u64) -> Option<Deadline> {
        UNIX_EPOCH.checked_add(Duration::from_millis(ms)).map(Deadline)
    }

    /// How long ago it passed at `now` (`None`: not yet).
    pub fn passed(self, now: SystemTime) -> Option<Duration> {
        now.duration_since(self.0).ok()
    }

    /// The same moment on the monotonic clock (the engine's), as seen now: a deadline already
    /// passed is now.
    pub fn instant(self) -> Instant {
        Instant::now() + self.0.duration_since(SystemTime::now()).unwrap_or_default()
    }
}

/// RFC 3339 in UTC, to the millisecond.
impl fmt::Display for Deadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        match OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok().and_then(|t| t.format(&Rfc3339).ok()) {
            Some(text) => f.write_str(&text),
            // Past year 9999 (the integer form reaches further): said as it was given.
            None => write!(f, "{ms} ms since the epoch"),
        }
    }
}

/// Why a job with this `deadline` and `timeout` (its `timeout_ms`) may no longer start, `age`
/// after its publish, at `now`: either passed. The answer is a `timeout` error (final, never
/// retried). Plain values, not the job: the job's types sit above this file.
pub fn late(deadline: Option<Deadline>, timeout: Option<Duration>, age: Duration, now: SystemTime) -> Option<JobError> {
    let waited = age.as_secs_f64() * 1e3;
    if let Some(passed) = deadline.and_then(|d| d.passed(now).map(|p| (d, p))) {
        let (deadline, by) = passed;
        let msg = format!("deadline {deadline} passed {:.0} ms before the job could start (it waited {waited:.0} ms)", by.as_secs_f64() * 1e3);
        return Some(JobError::new(ErrorCode::Timeout, msg));
    }
    timeout
        .filter(|limit| age > *limit)
        .map(|_| JobError::new(ErrorCode::Timeout, format!("waited {waited:.0} ms, over the job's timeout_ms")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Deadline, String> {
        Deadline::parse(&v)
    }

    #[test]
    fn rfc3339_strings_and_epoch_milliseconds_name_the_same_moment() {
        // 2026-11-26T12:00:00Z is 1_795_694_400 s after the epoch.
        let noon = Deadline::from_unix_ms(1_795_694_400_000).unwrap();
        assert_eq!(parse(Value::from("2026-11-26T12:00:00Z")).unwrap(), noon);
        assert_eq!(parse(Value::from("2026-11-26T13:30:00+01:30")).unwrap(), noon, "an offset");
        assert_eq!(parse(Value::from("2026-11-26t12:00:00z")).unwrap(), noon, "lower-case separators are RFC 3339 too");
        assert_eq!(parse(Value::from(1_795_694_400_000u64)).unwrap(), noon);
        assert_eq!(parse(Value::from("2026-11-26T12:00:00.250Z")).unwrap(), Deadline::from_unix_ms(1_795_694_400_250).unwrap());
        assert_eq!(noon.to_string(), "2026-11-26T12:00:00Z");
        assert_eq!(Deadline::from_unix_ms(1_795_694_400_250).unwrap().to_string(), "2026-11-26T12:00:00.25Z");
    }

    #[test]
    fn malformed_deadlines_are_refused_naming_the_field() {
        let err = |v: Value| parse(v).unwrap_err();
        assert!(err(Value::from("tomorrow")).starts_with("deadline: 'tomorrow' is not an RFC 3339 timestamp"), "{}", err(Value::from("tomorrow")));
        assert!(err(Value::from("2026-11-26 12:00:00")).starts_with("deadline: '2026-11-26 12:00:00' is not"), "no offset, no T");
        assert!(err(Value::from("2026-11-26T12:00:00")).starts_with("deadline:"), "an offset is required");
        assert!(err(Value::from("1969-12-31T23:59:59Z")).contains("before 1970"));
        assert!(err(Value::from(-5)).starts_with("deadline: expected an RFC 3339 timestamp string"));
        assert!(err(Value::from(1.5e12)).starts_with("deadline: expected"), "a float is not milliseconds");
        assert!(err(Value::Boolean(true)).starts_with("deadline: expected"));
        assert_eq!(err(Value::from(1_795_694_400u64)), "deadline: 1795694400 ms since the epoch is before 1973; seconds? (the integer form is milliseconds)");
    }

    #[test]
    fn far_future_deadlines_are_far_not_before_1970() {
        // 2600-01-01T00:00:00Z is 19_880_899_200 s after the epoch: past u64 nanoseconds (2554).
        let far = parse(Value::from("2600-01-01T00:00:00.5Z")).unwrap();
        assert_eq!(far, Deadline::from_unix_ms(19_880_899_200_500).unwrap());
        assert_eq!(far.to_string(), "2600-01-01T00:00:00.5Z");
        assert_eq!(far.passed(SystemTime::now()), None);
        assert!(far.instant() > Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        assert_eq!(parse(Value::from("9999-12-31T23:59:59Z")).unwrap().to_string(), "9999-12-31T23:59:59Z");
        let furthest = parse(Value::from(u64::MAX)).unwrap();
        assert_eq!(furthest.to_string(), format!("{} ms since the epoch", u64::MAX));
        assert_eq!(furthest.passed(SystemTime::now()), None);
    }

    #[test]
    fn a_deadline_has_passed_only_after_it() {
        let d = Deadline::from_unix_ms(1_795_694_400_000).unwrap();
        let at = UNIX_EPOCH + Duration::from_millis(1_795_694_400_000);
        assert_eq!(d.passed(at - Duration::from_millis(1)), None);
        assert_eq!(d.passed(at + Duration::from_millis(1500)), Some(Duration::from_millis(1500)));
        let past = Deadline(SystemTime::now() - Duration::from_secs(5));
        assert!(past.instant() <= Instant::now());
        let future = Deadline(SystemTime::now() + Duration::from_secs(60));
        assert!(future.instant() > Instant::now() + Duration::from_secs(59));
    }

    #[test]
    fn a_job_is_late_past_its_deadline_or_its_timeout() {
        let noon = Deadline::from_unix_ms(1_795_694_400_000);
        let at = UNIX_EPOCH + Duration::from_millis(1_795_694_400_000);
        let (age, limit) = (Duration::from_millis(300), Some(Duration::from_millis(200)));
        assert_eq!(late(noon, None, age, at - Duration::from_millis(1)), None);
        assert_eq!(late(None, None, age, at), None);
        assert_eq!(late(None, Some(age), age, at), None, "at the limit is not over it");
        let by_deadline = late(noon, limit, age, at + Duration::from_millis(1500)).unwrap();
        assert_eq!(by_deadline.code, ErrorCode::Timeout);
        assert_eq!(by_deadline.message, "deadline 2026-11-26T12:00:00Z passed 1500 ms before the job could start (it waited 300 ms)");
        let by_timeout = late(noon, limit, age, at - Duration::from_millis(1)).unwrap();
        assert_eq!((by_timeout.code, by_timeout.message.as_str()), (ErrorCode::Timeout, "waited 300 ms, over the job's timeout_ms"));
    }
}
