//! Cron schedules, in the operator's terms. Accepts the classic five fields
//! (`minute hour day-of-month month day-of-week`), six with seconds first,
//! and the shorthands `@hourly`, `@daily` (`@midnight`), `@weekly`,
//! `@monthly`, `@yearly` (`@annually`). Anything else is refused with a
//! message that names the field and the allowed range, never the `cron`
//! crate's internal six-field form.

use std::str::FromStr;

/// The five classic fields, then the seconds field of the six-field form.
const FIELDS: [(&str, u32, u32); 5] =
    [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)];

const FORMS: &str = "5 fields (minute hour day-of-month month day-of-week, e.g. \"0 2 * * *\"), \
                     6 with seconds first, or @hourly, @daily, @weekly, @monthly, @yearly";

/// Parses a schedule expression.
///
/// # Errors
/// A message naming the expression and what is wrong with it.
pub fn parse(expr: &str) -> Result<cron::Schedule, String> {
    let e = expr.trim();
    let short = match e {
        "@hourly" => Some("0 0 * * * *"),
        "@daily" | "@midnight" => Some("0 0 0 * * *"),
        "@weekly" => Some("0 0 0 * * Sun"),
        "@monthly" => Some("0 0 0 1 * *"),
        "@yearly" | "@annually" => Some("0 0 0 1 1 *"),
        _ => None,
    };
    if let Some(s) = short {
        return cron::Schedule::from_str(s).map_err(|err| format!("schedule '{expr}': {err}"));
    }
    if e.starts_with('@') {
        return Err(format!("schedule '{expr}': unknown shorthand; a schedule is {FORMS}"));
    }
    let fields: Vec<&str> = e.split_whitespace().collect();
    if matches!(e, "hourly" | "daily" | "midnight" | "weekly" | "monthly" | "yearly" | "annually") {
        return Err(format!("schedule '{expr}': write '@{e}' (with '@'); a schedule is {FORMS}"));
    }
    let named: Vec<(&str, u32, u32)> = match fields.len() {
        5 => FIELDS.to_vec(),
        6 => std::iter::once(("second", 0, 59)).chain(FIELDS).collect(),
        n => return Err(format!("schedule '{expr}' has {n} field{}; a schedule is {FORMS}", if n == 1 { "" } else { "s" })),
    };
    for (text, (name, lo, hi)) in fields.iter().zip(&named) {
        check_field(text, name, *lo, *hi).map_err(|why| format!("schedule '{expr}': {why}"))?;
    }
    let full = if fields.len() == 5 { format!("0 {e}") } else { e.to_string() };
    cron::Schedule::from_str(&full).map_err(|err| format!("schedule '{expr}' is not a valid cron schedule ({err}); a schedule is {FORMS}"))
}

/// Checks the numbers of one field against its range (names such as `Mon`
/// or `Jan` are left to the cron crate).
fn check_field(text: &str, name: &str, lo: u32, hi: u32) -> Result<(), String> {
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (part, None),
        };
        if let Some(s) = step {
            match s.parse::<u32>() {
                Ok(0) | Err(_) => return Err(format!("the {name} field '{text}' has a step '/{s}' that is not a positive number")),
                Ok(_) => {}
            }
        }
        if range == "*" {
            continue;
        }
        let ends: Vec<&str> = range.split('-').collect();
        if ends.len() > 2 || ends.iter().any(|x| x.is_empty()) {
            return Err(format!("the {name} field '{text}' is not a number, a range a-b, a list a,b or a step */n"));
        }
        let mut nums = Vec::new();
        for x in &ends {
            match x.parse::<u32>() {
                Ok(n) if n < lo || n > hi => return Err(format!("{name} {n} is out of range: the {name} field takes {lo}-{hi}")),
                Ok(n) => nums.push(n),
                Err(_) if x.chars().all(|c| c.is_ascii_alphabetic()) && matches!(name, "month" | "day of week") => {}
                Err(_) => return Err(format!("the {name} field '{text}' is not a number, a range a-b, a list a,b or a step */n")),
            }
        }
        if let [a, b] = nums[..] {
            if a > b {
                return Err(format!("the {name} range {a}-{b} runs backwards"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn five_and_six_fields_and_shorthands() {
        assert!(parse("30 2 * * *").is_ok());
        assert!(parse("*/5 * * * * *").is_ok());
        assert!(parse("0 2 * * Mon-Fri").is_ok());
        for s in ["@daily", "@hourly", "@weekly", "@monthly", "@yearly"] {
            assert!(parse(s).is_ok(), "{s}");
        }
    }

    /// Issue 14 item 8: errors in the operator's terms.
    #[test]
    fn errors_name_the_field_and_never_the_internal_form() {
        let e = parse("61 1 * * *").unwrap_err();
        assert!(e.contains("minute 61 is out of range") && e.contains("0-59"), "{e}");
        assert!(!e.contains("0 61 1"), "{e}");
        let e = parse("daily").unwrap_err();
        assert!(e.contains("'@daily'"), "{e}");
        let e = parse("0 2 * *").unwrap_err();
        assert!(e.contains("has 4 fields"), "{e}");
        let e = parse("0 0 2 * * * 2030").unwrap_err();
        assert!(e.contains("has 7 fields"), "{e}");
        let e = parse("0 25 * * *").unwrap_err();
        assert!(e.contains("hour 25"), "{e}");
        assert!(parse("every day").is_err());
        assert!(parse("@sometimes").is_err());
    }
}
