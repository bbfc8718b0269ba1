//! UTC time formats S3 uses, without a date library: `20130524T000000Z`
//! (SigV4), `2013-05-24T00:00:00.000Z` (XML listings) and
//! `Fri, 24 May 2013 00:00:00 GMT` (`Last-Modified`). Times are Unix
//! seconds; dates before 1970 are not supported.

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // fits: doy is 0..=365 and mp 0..=11, so d is 1..=31 and m 1..=12.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let (d, m) = (
        (doy - (153 * mp + 2) / 5 + 1) as u32,
        if mp < 10 { mp + 3 } else { mp - 9 } as u32,
    );
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

struct Parts {
    y: i64,
    mo: u32,
    d: u32,
    h: u64,
    mi: u64,
    s: u64,
    wday: usize,
}

fn parts(secs: u64) -> Parts {
    // fits: u64::MAX / 86_400 is below 2^48.
    #[allow(clippy::cast_possible_wrap)]
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, mo, d) = civil_from_days(days);
    // fits: days >= 0, so this is 0..7.
    #[allow(clippy::cast_sign_loss)]
    let wday = ((days + 4) % 7) as usize;
    Parts {
        y,
        mo,
        d,
        h: rem / 3600,
        mi: rem % 3600 / 60,
        s: rem % 60,
        // 1970-01-01 was a Thursday.
        wday,
    }
}

/// `YYYYMMDDTHHMMSSZ`.
pub fn amz_date(secs: u64) -> String {
    let p = parts(secs);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        p.y, p.mo, p.d, p.h, p.mi, p.s
    )
}

/// `YYYY-MM-DDTHH:MM:SS.000Z`.
pub fn iso8601(secs: u64) -> String {
    let p = parts(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.000Z",
        p.y, p.mo, p.d, p.h, p.mi, p.s
    )
}

/// `Fri, 24 May 2013 00:00:00 GMT`.
pub fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let p = parts(secs);
    format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[p.wday],
        p.d,
        MONTHS[(p.mo as usize).saturating_sub(1) % 12],
        p.y,
        p.h,
        p.mi,
        p.s
    )
}

/// Parses `YYYYMMDDTHHMMSSZ`; `None` for anything else.
pub fn parse_amz_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&d)
        || h > 23
        || mi > 59
        || sec > 60
    {
        return None;
    }
    let days = days_from_civil(i64::from(y), mo, d);
    u64::try_from(days * 86_400 + i64::from(h * 3600 + mi * 60 + sec)).ok()
}

/// Parses an HTTP date in the IMF-fixdate form `http_date` writes
/// (`Fri, 24 May 2013 00:00:00 GMT`, the form S3 clients send in
/// `If-Modified-Since`); `None` for anything else.
pub fn parse_http_date(s: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let rest = s.trim().split_once(", ")?.1;
    let mut it = rest.split(' ');
    let (d, mo, y, hms, zone) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    if zone != "GMT" || it.next().is_some() || d.len() != 2 || y.len() != 4 || hms.len() != 8 {
        return None;
    }
    let mo = u32::try_from(MONTHS.iter().position(|m| *m == mo)? + 1).ok()?;
    let digits = |t: &str| {
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse::<u32>().ok())?
    };
    let (d, y) = (digits(d)?, digits(y)?);
    let mut t = hms.split(':');
    let (h, mi, sec) = (digits(t.next()?)?, digits(t.next()?)?, digits(t.next()?)?);
    if !(1970..=9999).contains(&y) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(i64::from(y), mo, d);
    u64::try_from(days * 86_400 + i64::from(h * 3600 + mi * 60 + sec)).ok()
}

/// Now, Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn http_dates_round_trip_and_bad_ones_are_none() {
        for secs in [0, 1_369_353_600, 1_764_201_600, 4_102_444_799] {
            assert_eq!(parse_http_date(&http_date(secs)), Some(secs));
        }
        assert_eq!(
            parse_http_date("Fri, 24 May 2013 00:00:00 GMT"),
            Some(1_369_353_600)
        );
        for bad in [
            "",
            "24 May 2013 00:00:00 GMT",
            "Fri, 24 May 2013 00:00:00 UTC",
            "Fri, 24 Foo 2013 00:00:00 GMT",
            "Fri, 24 May 2013 25:00:00 GMT",
            "Friday, 24-May-13 00:00:00 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_and_round_trips() {
        // 2013-05-24T00:00:00Z, a Friday.
        let t = 1_369_353_600;
        assert_eq!(amz_date(t), "20130524T000000Z");
        assert_eq!(iso8601(t + 3723), "2013-05-24T01:02:03.000Z");
        assert_eq!(http_date(t), "Fri, 24 May 2013 00:00:00 GMT");
        assert_eq!(parse_amz_date("20130524T000000Z"), Some(t));
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        for secs in [
            0u64,
            951_782_400,
            1_709_164_800,
            4_102_444_799,
            1_234_567_890,
        ] {
            assert_eq!(parse_amz_date(&amz_date(secs)), Some(secs));
        }
        for bad in [
            "",
            "20130524T000000",
            "2013052XT000000Z",
            "20131324T000000Z",
            "20130524T250000Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
    }
}
