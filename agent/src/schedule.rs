//! Cron schedules. Accepts the classic five fields (`min hour dom month dow`)
//! and the `cron` crate's six or seven (with seconds, and years).

use std::str::FromStr;

/// Parses a schedule expression.
///
/// # Errors
/// A message naming the expression and what is wrong with it.
pub fn parse(expr: &str) -> Result<cron::Schedule, String> {
    let fields = expr.split_whitespace().count();
    let full = if fields == 5 { format!("0 {expr}") } else { expr.to_string() };
    cron::Schedule::from_str(&full).map_err(|e| format!("'{expr}' is not a valid cron schedule: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn five_and_six_fields() {
        assert!(super::parse("30 2 * * *").is_ok());
        assert!(super::parse("*/5 * * * * *").is_ok());
        assert!(super::parse("every day").is_err());
        assert!(super::parse("61 * * * *").is_err());
    }
}
