//! Scheduled bounds: a 5-field cron subset (`min hour dom month dow`; `*`, lists, ranges,
//! steps), evaluated in UTC as a pure function of a Unix time, and the replica bounds in force
//! at that time.

use super::policy::Bounds;

/// A parsed cron expression: one bit per allowed value of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    /// Bit 0 = Sunday (7 is folded into 0).
    days_of_week: u64,
    dom_restricted: bool,
    dow_restricted: bool,
}

/// A calendar minute in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CivilTime {
    pub minute: u32,
    pub hour: u32,
    pub day: u32,
    pub month: u32,
    /// 0 = Sunday.
    pub weekday: u32,
}

impl CivilTime {
    /// The UTC calendar fields of a Unix time (days-from-civil inverse, proleptic Gregorian).
    pub fn from_unix(seconds: u64) -> CivilTime {
        let days = (seconds / 86_400) as i64;
        let of_day = seconds % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        CivilTime {
            minute: ((of_day / 60) % 60) as u32,
            hour: (of_day / 3600) as u32,
            day,
            month,
            // 1970-01-01 was a Thursday.
            weekday: ((days + 4).rem_euclid(7)) as u32,
        }
    }
}

impl Cron {
    pub fn parse(text: &str) -> Result<Cron, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields.as_slice() else {
            return Err(format!(
                "`{text}`: expected 5 fields (minute hour day-of-month month day-of-week)"
            ));
        };
        let mut days_of_week = parse_field(dow, 0, 7, "day-of-week")?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week | 1) & !(1 << 7);
        }
        Ok(Cron {
            minutes: parse_field(minute, 0, 59, "minute")?,
            hours: parse_field(hour, 0, 23, "hour")?,
            days_of_month: parse_field(dom, 1, 31, "day-of-month")?,
            months: parse_field(month, 1, 12, "month")?,
            days_of_week,
            dom_restricted: !dom.starts_with('*'),
            dow_restricted: !dow.starts_with('*'),
        })
    }

    /// Whether the minute `t` matches. As in cron, when both day fields are restricted a day
    /// matching either one is enough.
    pub fn matches(&self, t: CivilTime) -> bool {
        let bit = |mask: u64, value: u32| mask & (1 << value) != 0;
        let dom = bit(self.days_of_month, t.day);
        let dow = bit(self.days_of_week, t.weekday);
        let day = if self.dom_restricted && self.dow_restricted {
            dom || dow
        } else {
            dom && dow
        };
        bit(self.minutes, t.minute) && bit(self.hours, t.hour) && bit(self.months, t.month) && day
    }
}

fn parse_field(text: &str, low: u32, high: u32, name: &str) -> Result<u64, String> {
    let mut mask = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u32 = step
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{name}: bad step in `{part}`"))?;
                (range, step)
            }
            None => (part, 1),
        };
        let (from, to) = if range == "*" {
            (low, high)
        } else {
            let number = |s: &str| -> Result<u32, String> {
                s.parse::<u32>()
                    .ok()
                    .filter(|v| (low..=high).contains(v))
                    .ok_or_else(|| format!("{name}: `{s}` is not in {low}-{high}"))
            };
            match range.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                // `5/15` means from 5 to the end, every 15.
                None if step > 1 => (number(range)?, high),
                None => {
                    let v = number(range)?;
                    (v, v)
                }
            }
        };
        if from > to {
            return Err(format!("{name}: range `{range}` runs backwards"));
        }
        for value in (from..=to).step_by(step as usize) {
            mask |= 1 << value;
        }
    }
    Ok(mask)
}

/// A window of different bounds, active in every minute its cron matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub cron: Cron,
    pub min: Option<u32>,
    pub max: Option<u32>,
}

/// The bounds at Unix time `now_unix`: the active schedules that set a bound replace the base
/// one (several: the largest); one that sets only `min` leaves another's `max` in force. Min
/// never exceeds max.
pub fn bounds_at(base: Bounds, schedules: &[Schedule], now_unix: u64) -> Bounds {
    let t = CivilTime::from_unix(now_unix);
    let active: Vec<&Schedule> = schedules.iter().filter(|s| s.cron.matches(t)).collect();
    let min = active
        .iter()
        .filter_map(|s| s.min)
        .max()
        .unwrap_or(base.min);
    let max = active
        .iter()
        .filter_map(|s| s.max)
        .max()
        .unwrap_or(base.max);
    Bounds {
        min: min.min(max),
        max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-03-04 (a Monday) 09:30:00 UTC.
    const MONDAY_0930: u64 = 1_709_544_600;

    /// A weekend floor does not lift a night cap active at the same time.
    #[test]
    fn a_schedule_setting_only_min_keeps_another_ones_max() {
        let every_minute = || Cron::parse("* * * * *").unwrap();
        let schedules = [
            Schedule {
                cron: every_minute(),
                min: None,
                max: Some(2),
            },
            Schedule {
                cron: every_minute(),
                min: Some(1),
                max: None,
            },
        ];
        let base = Bounds { min: 1, max: 6 };
        assert_eq!(
            bounds_at(base, &schedules, MONDAY_0930),
            Bounds { min: 1, max: 2 }
        );
    }

    #[test]
    fn civil_time_from_unix() {
        let t = CivilTime::from_unix(MONDAY_0930);
        assert_eq!(
            t,
            CivilTime {
                minute: 30,
                hour: 9,
                day: 4,
                month: 3,
                weekday: 1
            }
        );
        let epoch = CivilTime::from_unix(0);
        assert_eq!((epoch.day, epoch.month, epoch.weekday), (1, 1, 4));
        // 2024-02-29 23:59 (leap day, a Thursday).
        let leap = CivilTime::from_unix(1_709_251_140);
        assert_eq!(
            (leap.day, leap.month, leap.hour, leap.minute, leap.weekday),
            (29, 2, 23, 59, 4)
        );
    }

    #[test]
    fn cron_fields() {
        let business = Cron::parse("* 9-17 * * 1-5").unwrap();
        assert!(business.matches(CivilTime::from_unix(MONDAY_0930)));
        assert!(!business.matches(CivilTime::from_unix(MONDAY_0930 + 9 * 3600)));
        assert!(!business.matches(CivilTime::from_unix(MONDAY_0930 - 86_400))); // Sunday
        let quarter = Cron::parse("*/15 * * * *").unwrap();
        assert!(quarter.matches(CivilTime::from_unix(MONDAY_0930)));
        assert!(!quarter.matches(CivilTime::from_unix(MONDAY_0930 + 60)));
        let sunday = Cron::parse("0 0 * * 7").unwrap();
        assert!(sunday.matches(CivilTime::from_unix(MONDAY_0930 - 9 * 3600 - 1800 - 86_400)));
        let listed = Cron::parse("30 8,9 1,4 3 *").unwrap();
        assert!(listed.matches(CivilTime::from_unix(MONDAY_0930)));
        // Both day fields restricted: either may match (day 1 or Friday; this is Monday the 4th).
        assert!(!Cron::parse("30 9 1 * 5")
            .unwrap()
            .matches(CivilTime::from_unix(MONDAY_0930)));
        assert!(Cron::parse("30 9 1 * 1")
            .unwrap()
            .matches(CivilTime::from_unix(MONDAY_0930)));
        assert!(Cron::parse("10/20 * * * *").unwrap().matches(CivilTime {
            minute: 50,
            ..CivilTime::from_unix(MONDAY_0930)
        }));
    }

    #[test]
    fn cron_errors_say_what_is_wrong() {
        assert!(Cron::parse("* * * *").unwrap_err().contains("5 fields"));
        assert!(Cron::parse("60 * * * *").unwrap_err().contains("minute"));
        assert!(Cron::parse("* 5-2 * * *")
            .unwrap_err()
            .contains("backwards"));
        assert!(Cron::parse("*/0 * * * *").unwrap_err().contains("step"));
        assert!(Cron::parse("* * 0 * *")
            .unwrap_err()
            .contains("day-of-month"));
    }

    #[test]
    fn schedules_raise_the_floor_while_active() {
        let base = Bounds { min: 1, max: 4 };
        let schedules = [
            Schedule {
                cron: Cron::parse("* 9-17 * * 1-5").unwrap(),
                min: Some(3),
                max: None,
            },
            Schedule {
                cron: Cron::parse("* 9 * * *").unwrap(),
                min: Some(2),
                max: Some(8),
            },
        ];
        assert_eq!(
            bounds_at(base, &schedules, MONDAY_0930),
            Bounds { min: 3, max: 8 }
        );
        assert_eq!(
            bounds_at(base, &schedules, MONDAY_0930 + 3600),
            Bounds { min: 3, max: 4 }
        );
        assert_eq!(bounds_at(base, &schedules, MONDAY_0930 + 12 * 3600), base);
    }
}
