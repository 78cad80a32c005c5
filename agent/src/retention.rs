//! Retention policy: which backups of one image a prune keeps.
//!
//! This module is pure: it takes the list of backups (id, local wall time,
//! protected flag) and a [`RetentionPolicy`] and returns a plan that says, for
//! every backup, [`PruneAction::Keep`] with the rule that decided it, or
//! [`PruneAction::Remove`]. Deleting catalog rows and running GC is the
//! caller's job (plan, then apply).
//!
//! # Model
//!
//! Backups are ordered newest first (by time; equal times by descending id, so
//! the higher id counts as the newer one). The rules run in this fixed order:
//! `keep-last`, `keep-hourly`, `keep-daily`, `keep-weekly`, `keep-monthly`,
//! `keep-yearly`.
//!
//! - `keep-last N` keeps the N newest backups. Every backup is its own slot,
//!   even if two share a timestamp.
//! - A time rule `keep-<period> N` walks the backups newest to oldest and keeps
//!   the newest backup of each distinct period (hour, calendar day, ISO 8601
//!   week, calendar month, calendar year) until N periods have been kept. Older
//!   backups in the same period are not kept by that rule.
//! - A period that already holds a backup kept by an earlier rule is *covered*:
//!   the rule keeps nothing more in it and the period does not use up one of
//!   its N slots. So `keep-last 1, keep-daily 2` keeps the newest backup plus
//!   the newest backup of each of the two days before the newest backup's day.
//!   This is Proxmox Backup Server's reading ("the next option … will only
//!   consider older backups"); restic instead lets one backup satisfy several
//!   rules at once, so the same policy keeps fewer backups there.
//! - Unlike PBS, a backup that one rule passed over (because a newer backup in
//!   its period was kept) stays a candidate for the later rules. This matters
//!   where periods do not nest: ISO weeks straddle month and year boundaries.
//!   With Mon 30 Nov and Tue 1 Dec in one ISO week, `keep-weekly` keeps 1 Dec,
//!   and `keep-monthly` still keeps 30 Nov as the newest backup of November,
//!   where PBS would pick an older November backup. Each rule thus keeps
//!   exactly "the newest backup of each period", which is what restic does too.
//! - Protected backups are always kept and are invisible to the rules: they use
//!   no slot and cover no period (as in PBS). A protected backup on a day does
//!   not stop `keep-daily` from also keeping the newest unprotected backup of
//!   that day.
//! - A policy with no rule set (every field `None` or `0`) keeps everything.
//!   `0` means "not set", as in restic and PBS.
//! - Whenever any rule is set, the newest unprotected backup is always kept:
//!   the first rule that runs sees it first, with nothing covered and a free
//!   slot. No special case is needed for that; a test pins it down.
//!
//! Times are [`NaiveDateTime`] in local wall time: the caller converts from
//! UTC, so "a day" is the operator's day. Around a DST fall-back the repeated
//! wall hour counts as one hour, as it does in PBS.

use std::collections::HashSet;
use std::fmt;

use chrono::{Datelike, NaiveDateTime};
use serde::{Deserialize, Serialize};

/// How many backups of an image to keep, as read from the config.
///
/// Used both under `[defaults]` and per image:
/// `[[image]] retention = { keep-last = 3, keep-daily = 7 }`. A field that is
/// missing or `0` is not set. See the module docs for the semantics.
///
/// An image's policy replaces the `[defaults]` policy wholesale; fields are
/// not merged (the config's `ImageConfig::retention` does this). Merging would
/// let `retention = { keep-last = 3 }` on an image silently inherit, say,
/// `keep-yearly = 10` from `[defaults]`, which nobody reading the image entry
/// would expect. An image that sets `retention = {}` keeps all its backups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Keep the N newest backups.
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the last N hours that have backups.
    pub keep_hourly: Option<u32>,
    /// Keep the newest backup of each of the last N days that have backups.
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the last N ISO weeks that have backups.
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the last N months that have backups.
    pub keep_monthly: Option<u32>,
    /// Keep the newest backup of each of the last N years that have backups.
    pub keep_yearly: Option<u32>,
}

impl RetentionPolicy {
    /// True if no rule is set (all `None` or `0`): such a policy keeps every
    /// backup.
    pub fn is_empty(&self) -> bool {
        count(self.keep_last) == 0 && TimeRule::ALL.iter().all(|&rule| self.count(rule) == 0)
    }

    fn count(&self, rule: TimeRule) -> u32 {
        count(match rule {
            TimeRule::Hourly => self.keep_hourly,
            TimeRule::Daily => self.keep_daily,
            TimeRule::Weekly => self.keep_weekly,
            TimeRule::Monthly => self.keep_monthly,
            TimeRule::Yearly => self.keep_yearly,
        })
    }
}

fn count(rule: Option<u32>) -> u32 {
    rule.unwrap_or(0)
}

/// Renders the set rules in config syntax, e.g. `keep-last=3, keep-daily=7`,
/// or `keep all` for an empty policy. For logs and `prune` headers.
impl fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("keep all");
        }
        let mut sep = "";
        if count(self.keep_last) > 0 {
            write!(f, "keep-last={}", count(self.keep_last))?;
            sep = ", ";
        }
        for rule in TimeRule::ALL {
            let n = self.count(rule);
            if n > 0 {
                write!(f, "{sep}{}={n}", rule.name())?;
                sep = ", ";
            }
        }
        Ok(())
    }
}

/// One backup as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    /// Catalog id of the backup.
    pub id: u64,
    /// When the backup was taken, in local wall time (the caller converts).
    pub time: NaiveDateTime,
    /// Protected backups are never removed.
    pub protected: bool,
}

/// The time-period rules, in the order they are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimeRule {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl TimeRule {
    /// All time rules, in application order.
    pub const ALL: [TimeRule; 5] = [
        TimeRule::Hourly,
        TimeRule::Daily,
        TimeRule::Weekly,
        TimeRule::Monthly,
        TimeRule::Yearly,
    ];

    /// The config key of the rule, e.g. `keep-daily`.
    pub fn name(self) -> &'static str {
        match self {
            TimeRule::Hourly => "keep-hourly",
            TimeRule::Daily => "keep-daily",
            TimeRule::Weekly => "keep-weekly",
            TimeRule::Monthly => "keep-monthly",
            TimeRule::Yearly => "keep-yearly",
        }
    }

    /// The period `time` falls in, as a label that is also the identity of
    /// the period: `2026-11-20T14`, `2026-11-20`, `2026-W47`, `2026-11`,
    /// `2026`.
    ///
    /// Weeks use the ISO week-numbering year, so 31 Dec 2024 is `2025-W01`
    /// and 1 Jan 2027 is `2026-W53`.
    pub fn period(self, time: NaiveDateTime) -> String {
        match self {
            TimeRule::Hourly => time.format("%Y-%m-%dT%H").to_string(),
            TimeRule::Daily => time.format("%Y-%m-%d").to_string(),
            TimeRule::Weekly => {
                let week = time.iso_week();
                format!("{:04}-W{:02}", week.year(), week.week())
            }
            TimeRule::Monthly => time.format("%Y-%m").to_string(),
            TimeRule::Yearly => format!("{:04}", time.year()),
        }
    }
}

/// Why a backup is kept: the first rule that claimed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// The backup is protected.
    Protected,
    /// The policy sets no rule, so everything is kept.
    NoPolicy,
    /// The `nth` newest backup under `keep-last {of}`.
    Last { nth: u32, of: u32 },
    /// The newest backup of `period`, the `nth` period kept under
    /// `rule` = `of`.
    Period {
        rule: TimeRule,
        period: String,
        nth: u32,
        of: u32,
    },
}

/// Renders as `protected`, `no policy: keep all`, `keep-last 2/3`, or
/// `keep-daily 2026-11-20 (2/7)`.
impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::Protected => f.write_str("protected"),
            KeepReason::NoPolicy => f.write_str("no policy: keep all"),
            KeepReason::Last { nth, of } => write!(f, "keep-last {nth}/{of}"),
            KeepReason::Period {
                rule,
                period,
                nth,
                of,
            } => {
                write!(f, "{} {period} ({nth}/{of})", rule.name())
            }
        }
    }
}

/// What prune does with one backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PruneAction {
    Keep(KeepReason),
    Remove,
}

impl PruneAction {
    pub fn is_keep(&self) -> bool {
        matches!(self, PruneAction::Keep(_))
    }
}

/// One line of a prune plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PruneItem {
    pub backup: BackupInfo,
    pub action: PruneAction,
}

/// One `prune --dry-run` line, e.g.
/// `keep   #42  2026-11-20 14:00:00  keep-daily 2026-11-20 (1/7)` or
/// `remove #41  2026-11-20 02:00:00`.
impl fmt::Display for PruneItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = self.backup.time.format("%Y-%m-%d %H:%M:%S");
        let id = format!("#{}", self.backup.id);
        match &self.action {
            PruneAction::Keep(reason) => write!(f, "keep   {id:<6} {time}  {reason}"),
            PruneAction::Remove => write!(f, "remove {id:<6} {time}"),
        }
    }
}

/// Renders a whole plan, one [`PruneItem`] per line, then a summary line
/// `N kept, M to remove`. See [`render_plan`].
pub struct PlanDisplay<'a>(&'a [PruneItem]);

/// Wraps a plan for printing, e.g. `print!("{}", render_plan(&items))`.
pub fn render_plan(items: &[PruneItem]) -> PlanDisplay<'_> {
    PlanDisplay(items)
}

impl fmt::Display for PlanDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for item in self.0 {
            writeln!(f, "{item}")?;
        }
        let kept = self.0.iter().filter(|item| item.action.is_keep()).count();
        writeln!(f, "{kept} kept, {} to remove", self.0.len() - kept)
    }
}

/// Decides, for every backup, whether the policy keeps or removes it.
///
/// `backups` may come in any order; the plan lists every backup exactly once,
/// newest first (time descending, then id descending). See the module docs
/// for the rules.
pub fn plan(policy: &RetentionPolicy, backups: &[BackupInfo]) -> Vec<PruneItem> {
    let mut order = backups.to_vec();
    order.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.cmp(&a.id)));

    let mut decided: Vec<Option<KeepReason>> = order
        .iter()
        .map(|b| b.protected.then_some(KeepReason::Protected))
        .collect();

    if policy.is_empty() {
        for slot in decided.iter_mut().filter(|slot| slot.is_none()) {
            *slot = Some(KeepReason::NoPolicy);
        }
    } else {
        let last = count(policy.keep_last);
        let candidates = order.iter().enumerate().filter(|(_, b)| !b.protected);
        for (nth, (i, _)) in (1..=last).zip(candidates) {
            decided[i] = Some(KeepReason::Last { nth, of: last });
        }

        for rule in TimeRule::ALL {
            let of = policy.count(rule);
            if of == 0 {
                continue;
            }
            // Periods that an earlier rule already holds a kept backup in.
            // Protected backups stand outside the rules and cover nothing.
            let covered: HashSet<String> = order
                .iter()
                .zip(&decided)
                .filter(|(b, reason)| !b.protected && reason.is_some())
                .map(|(b, _)| rule.period(b.time))
                .collect();
            let mut seen = HashSet::new();
            let mut nth = 0;
            for (i, backup) in order.iter().enumerate() {
                if backup.protected {
                    continue;
                }
                let period = rule.period(backup.time);
                if covered.contains(&period) || seen.contains(&period) {
                    continue;
                }
                if nth == of {
                    break;
                }
                nth += 1;
                seen.insert(period.clone());
                // Anything already kept sits in a covered period, so this
                // backup is still undecided.
                debug_assert!(decided[i].is_none());
                decided[i] = Some(KeepReason::Period {
                    rule,
                    period,
                    nth,
                    of,
                });
            }
        }
    }

    order
        .into_iter()
        .zip(decided)
        .map(|(backup, reason)| PruneItem {
            backup,
            action: reason.map_or(PruneAction::Remove, PruneAction::Keep),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|date| date.and_hms_opt(h, min, 0))
            .expect("valid test date")
    }

    fn backup(id: u64, time: NaiveDateTime) -> BackupInfo {
        BackupInfo {
            id,
            time,
            protected: false,
        }
    }

    fn protected(id: u64, time: NaiveDateTime) -> BackupInfo {
        BackupInfo {
            id,
            time,
            protected: true,
        }
    }

    fn policy(f: impl FnOnce(&mut RetentionPolicy)) -> RetentionPolicy {
        let mut p = RetentionPolicy::default();
        f(&mut p);
        p
    }

    /// Ids kept, in plan order (newest first).
    fn kept(policy: &RetentionPolicy, backups: &[BackupInfo]) -> Vec<u64> {
        plan(policy, backups)
            .iter()
            .filter(|item| item.action.is_keep())
            .map(|item| item.backup.id)
            .collect()
    }

    fn reason_of(items: &[PruneItem], id: u64) -> String {
        let item = items
            .iter()
            .find(|item| item.backup.id == id)
            .expect("id in plan");
        match &item.action {
            PruneAction::Keep(reason) => reason.to_string(),
            PruneAction::Remove => "remove".to_owned(),
        }
    }

    /// One backup a day at 01:00 from 2026-11-01 (id 1) to 2026-11-20 (id 20).
    fn daily_november() -> Vec<BackupInfo> {
        (1..=20)
            .map(|d| backup(u64::from(d), at(2026, 11, d, 1, 0)))
            .collect()
    }

    #[test]
    fn empty_policy_keeps_everything() {
        let backups = daily_november();
        let items = plan(&RetentionPolicy::default(), &backups);
        assert_eq!(items.len(), 20);
        assert!(items
            .iter()
            .all(|item| item.action == PruneAction::Keep(KeepReason::NoPolicy)));
        assert_eq!(reason_of(&items, 3), "no policy: keep all");
    }

    #[test]
    fn all_zero_policy_is_empty_and_keeps_everything() {
        let zero = RetentionPolicy {
            keep_last: Some(0),
            keep_hourly: Some(0),
            keep_daily: Some(0),
            keep_weekly: Some(0),
            keep_monthly: Some(0),
            keep_yearly: Some(0),
        };
        assert!(zero.is_empty());
        assert_eq!(kept(&zero, &daily_november()).len(), 20);
    }

    #[test]
    fn empty_input_gives_empty_plan() {
        assert!(plan(&policy(|p| p.keep_last = Some(3)), &[]).is_empty());
        assert!(plan(&RetentionPolicy::default(), &[]).is_empty());
    }

    #[test]
    fn keep_last_keeps_n_newest() {
        let backups = daily_november();
        let p = policy(|p| p.keep_last = Some(3));
        assert_eq!(kept(&p, &backups), vec![20, 19, 18]);
        let items = plan(&p, &backups);
        assert_eq!(reason_of(&items, 20), "keep-last 1/3");
        assert_eq!(reason_of(&items, 18), "keep-last 3/3");
        assert_eq!(reason_of(&items, 17), "remove");
    }

    #[test]
    fn keep_last_counts_backups_not_timestamps() {
        // Two backups with the same timestamp are two slots; the higher id is
        // the newer one.
        let t = at(2026, 11, 20, 12, 0);
        let backups = [
            backup(5, t),
            backup(7, t),
            backup(6, at(2026, 11, 20, 11, 0)),
        ];
        assert_eq!(
            kept(&policy(|p| p.keep_last = Some(2)), &backups),
            vec![7, 5]
        );
    }

    #[test]
    fn keep_last_larger_than_list_keeps_all() {
        let backups = daily_november();
        assert_eq!(
            kept(&policy(|p| p.keep_last = Some(100)), &backups).len(),
            20
        );
    }

    #[test]
    fn keep_hourly_keeps_newest_per_hour() {
        let backups = [
            backup(1, at(2026, 11, 20, 10, 5)),
            backup(2, at(2026, 11, 20, 10, 35)),
            backup(3, at(2026, 11, 20, 11, 5)),
            backup(4, at(2026, 11, 20, 11, 50)),
            backup(5, at(2026, 11, 20, 13, 0)),
        ];
        let p = policy(|p| p.keep_hourly = Some(3));
        assert_eq!(kept(&p, &backups), vec![5, 4, 2]);
        assert_eq!(
            reason_of(&plan(&p, &backups), 2),
            "keep-hourly 2026-11-20T10 (3/3)"
        );
        // Hours are counted among hours that have backups: 12:00 is skipped.
        assert_eq!(
            kept(&policy(|p| p.keep_hourly = Some(2)), &backups),
            vec![5, 4]
        );
    }

    #[test]
    fn keep_daily_ties_in_same_day_keep_only_newest() {
        let backups = [
            backup(1, at(2026, 11, 19, 1, 0)),
            backup(2, at(2026, 11, 19, 13, 0)),
            backup(3, at(2026, 11, 19, 23, 59)),
            backup(4, at(2026, 11, 20, 0, 0)),
            backup(5, at(2026, 11, 20, 12, 0)),
            backup(6, at(2026, 11, 18, 12, 0)),
        ];
        let p = policy(|p| p.keep_daily = Some(2));
        assert_eq!(kept(&p, &backups), vec![5, 3]);
        let items = plan(&p, &backups);
        assert_eq!(reason_of(&items, 5), "keep-daily 2026-11-20 (1/2)");
        assert_eq!(reason_of(&items, 3), "keep-daily 2026-11-19 (2/2)");
    }

    #[test]
    fn same_timestamp_in_one_period_keeps_higher_id() {
        let t = at(2026, 11, 20, 12, 0);
        let backups = [backup(8, t), backup(9, t)];
        assert_eq!(kept(&policy(|p| p.keep_daily = Some(5)), &backups), vec![9]);
    }

    #[test]
    fn keep_weekly_uses_monday_based_weeks() {
        // 2026-11-16 is a Monday, 2026-11-22 a Sunday (ISO week 47).
        let backups = [
            backup(1, at(2026, 11, 15, 9, 0)), // Sun, week 46
            backup(2, at(2026, 11, 16, 9, 0)), // Mon, week 47
            backup(3, at(2026, 11, 22, 9, 0)), // Sun, week 47
            backup(4, at(2026, 11, 23, 9, 0)), // Mon, week 48
            backup(5, at(2026, 11, 9, 9, 0)),  // Mon, week 46
        ];
        let p = policy(|p| p.keep_weekly = Some(3));
        assert_eq!(kept(&p, &backups), vec![4, 3, 1]);
        assert_eq!(
            reason_of(&plan(&p, &backups), 3),
            "keep-weekly 2026-W47 (2/3)"
        );
    }

    #[test]
    fn keep_weekly_iso_week_spans_year_boundary() {
        // Mon 2024-12-30 and Tue 2024-12-31 belong to ISO week 2025-W01, as
        // does Fri 2025-01-03; Sun 2024-12-29 is 2024-W52. Fri 2027-01-01 is
        // in 2026-W53.
        assert_eq!(TimeRule::Weekly.period(at(2024, 12, 31, 0, 0)), "2025-W01");
        assert_eq!(TimeRule::Weekly.period(at(2024, 12, 29, 0, 0)), "2024-W52");
        assert_eq!(TimeRule::Weekly.period(at(2027, 1, 1, 0, 0)), "2026-W53");

        let backups = [
            backup(1, at(2024, 12, 29, 12, 0)),
            backup(2, at(2024, 12, 30, 12, 0)),
            backup(3, at(2024, 12, 31, 12, 0)),
            backup(4, at(2025, 1, 3, 12, 0)),
            backup(5, at(2025, 1, 6, 12, 0)), // 2025-W02
        ];
        let p = policy(|p| p.keep_weekly = Some(3));
        assert_eq!(kept(&p, &backups), vec![5, 4, 1]);
        let items = plan(&p, &backups);
        assert_eq!(reason_of(&items, 4), "keep-weekly 2025-W01 (2/3)");
        assert_eq!(reason_of(&items, 1), "keep-weekly 2024-W52 (3/3)");

        // Across years, the yearly rule splits what the weekly rule joins.
        let p = policy(|p| p.keep_yearly = Some(2));
        assert_eq!(kept(&p, &backups), vec![5, 3]);
    }

    #[test]
    fn keep_monthly_and_yearly() {
        let backups = [
            backup(1, at(2024, 3, 1, 0, 0)),
            backup(2, at(2024, 11, 30, 0, 0)),
            backup(3, at(2025, 6, 15, 0, 0)),
            backup(4, at(2025, 6, 30, 23, 0)),
            backup(5, at(2025, 12, 31, 23, 59)),
            backup(6, at(2026, 1, 1, 0, 0)),
        ];
        let monthly = policy(|p| p.keep_monthly = Some(3));
        assert_eq!(kept(&monthly, &backups), vec![6, 5, 4]);
        let yearly = policy(|p| p.keep_yearly = Some(5));
        assert_eq!(kept(&yearly, &backups), vec![6, 5, 2]);
        assert_eq!(
            reason_of(&plan(&yearly, &backups), 2),
            "keep-yearly 2024 (3/5)"
        );
    }

    #[test]
    fn unsorted_input_gives_same_decisions() {
        let mut backups = daily_november();
        let p = policy(|p| {
            p.keep_last = Some(2);
            p.keep_weekly = Some(2);
        });
        let sorted = plan(&p, &backups);
        backups.reverse();
        backups.swap(3, 11);
        backups.swap(0, 17);
        assert_eq!(plan(&p, &backups), sorted);
        // The plan is newest first whatever the input order.
        let ids: Vec<u64> = sorted.iter().map(|item| item.backup.id).collect();
        assert_eq!(ids, (1..=20).rev().collect::<Vec<u64>>());
    }

    #[test]
    fn combined_rules_do_not_reuse_covered_periods() {
        // PBS reading: keep-last 1 keeps Nov 20, so keep-daily 2 starts with the
        // days before it, and keep-weekly 2 starts with the weeks before those.
        // Nov 20 is a Friday of ISO week 47 (Mon 16 .. Sun 22).
        let backups = daily_november();
        let p = policy(|p| {
            p.keep_last = Some(1);
            p.keep_daily = Some(2);
            p.keep_weekly = Some(2);
        });
        // Week 47 is covered (20, 19, 18 kept); week 46 (9..15) keeps 15,
        // week 45 (2..8) keeps 8.
        assert_eq!(kept(&p, &backups), vec![20, 19, 18, 15, 8]);
        let items = plan(&p, &backups);
        assert_eq!(reason_of(&items, 20), "keep-last 1/1");
        assert_eq!(reason_of(&items, 19), "keep-daily 2026-11-19 (1/2)");
        assert_eq!(reason_of(&items, 18), "keep-daily 2026-11-18 (2/2)");
        assert_eq!(reason_of(&items, 15), "keep-weekly 2026-W46 (1/2)");
        assert_eq!(reason_of(&items, 8), "keep-weekly 2026-W45 (2/2)");
        assert_eq!(reason_of(&items, 1), "remove");
    }

    #[test]
    fn combined_typical_policy_over_a_year() {
        // Daily backups at 02:00 for all of 2026, plus one manual backup on
        // 2026-12-31 at 15:00.
        let mut backups = Vec::new();
        let mut day = NaiveDate::from_ymd_opt(2026, 1, 1).expect("date");
        let mut id = 0;
        while day.year() == 2026 {
            id += 1;
            backups.push(backup(id, day.and_hms_opt(2, 0, 0).expect("time")));
            day = day.succ_opt().expect("next day");
        }
        assert_eq!(id, 365);
        backups.push(backup(1000, at(2026, 12, 31, 15, 0)));
        let p = policy(|p| {
            p.keep_last = Some(2);
            p.keep_daily = Some(7);
            p.keep_weekly = Some(4);
            p.keep_monthly = Some(6);
            p.keep_yearly = Some(2);
        });
        let ids = kept(&p, &backups);
        // keep-last: 1000 and 365 (both Dec 31). keep-daily: Dec 30..24
        // (364..358). Dec 31 2026 is a Thursday in 2026-W53 (Dec 28..Jan 3),
        // covered. keep-weekly: W52 (Dec 21..27) is covered by Dec 24..27;
        // W51 ends Sun Dec 20 (354), W50 Dec 13 (347), W49 Dec 6 (340), W48
        // Nov 29 (333). keep-monthly: Dec and Nov covered; Oct 31 (304),
        // Sep 30 (273), Aug 31 (243), Jul 31 (212), Jun 30 (181), May 31
        // (151). keep-yearly: 2026 covered, no older year.
        assert_eq!(
            ids,
            vec![
                1000, 365, 364, 363, 362, 361, 360, 359, 358, 354, 347, 340, 333, 304, 273, 243,
                212, 181, 151
            ]
        );
    }

    #[test]
    fn passed_over_backup_stays_candidate_for_later_rules() {
        // Mon 2026-11-30 and Tue 2026-12-01 share ISO week 2026-W49. The weekly
        // rule keeps Dec 1 and passes over Nov 30; the monthly rule must still
        // keep Nov 30 as the newest backup of November (PBS would keep Nov 20).
        let backups = [
            backup(1, at(2026, 11, 20, 1, 0)),
            backup(2, at(2026, 11, 30, 1, 0)),
            backup(3, at(2026, 12, 1, 1, 0)),
        ];
        let p = policy(|p| {
            p.keep_weekly = Some(1);
            p.keep_monthly = Some(1);
        });
        assert_eq!(kept(&p, &backups), vec![3, 2]);
        assert_eq!(
            reason_of(&plan(&p, &backups), 2),
            "keep-monthly 2026-11 (1/1)"
        );
    }

    #[test]
    fn protected_is_kept_and_uses_no_slot() {
        let mut backups = daily_november();
        backups[19] = protected(20, at(2026, 11, 20, 1, 0));
        backups[4] = protected(5, at(2026, 11, 5, 1, 0));
        let p = policy(|p| p.keep_last = Some(2));
        // 20 is protected, so keep-last takes 19 and 18; 5 is kept anyway.
        assert_eq!(kept(&p, &backups), vec![20, 19, 18, 5]);
        let items = plan(&p, &backups);
        assert_eq!(reason_of(&items, 20), "protected");
        assert_eq!(reason_of(&items, 19), "keep-last 1/2");
        assert_eq!(reason_of(&items, 5), "protected");
    }

    #[test]
    fn protected_does_not_cover_its_period() {
        // A protected backup is the newest of Nov 20; keep-daily still keeps
        // the newest unprotected backup of that day.
        let backups = [
            backup(1, at(2026, 11, 19, 8, 0)),
            backup(2, at(2026, 11, 20, 8, 0)),
            protected(3, at(2026, 11, 20, 9, 0)),
            backup(4, at(2026, 11, 18, 8, 0)),
        ];
        let p = policy(|p| p.keep_daily = Some(2));
        assert_eq!(kept(&p, &backups), vec![3, 2, 1]);
    }

    #[test]
    fn protected_is_kept_under_empty_policy_with_its_own_reason() {
        let backups = [
            protected(1, at(2026, 11, 20, 8, 0)),
            backup(2, at(2026, 11, 21, 8, 0)),
        ];
        let items = plan(&RetentionPolicy::default(), &backups);
        assert_eq!(reason_of(&items, 1), "protected");
        assert_eq!(reason_of(&items, 2), "no policy: keep all");
    }

    #[test]
    fn all_protected_keeps_all() {
        let backups: Vec<BackupInfo> = (1..=5)
            .map(|d| protected(u64::from(d), at(2026, 11, d, 1, 0)))
            .collect();
        assert_eq!(
            kept(&policy(|p| p.keep_last = Some(1)), &backups),
            vec![5, 4, 3, 2, 1]
        );
    }

    #[test]
    fn newest_unprotected_is_always_kept_when_any_rule_is_set() {
        let backups = daily_november();
        let rules: [fn(&mut RetentionPolicy); 6] = [
            |p| p.keep_last = Some(1),
            |p| p.keep_hourly = Some(1),
            |p| p.keep_daily = Some(1),
            |p| p.keep_weekly = Some(1),
            |p| p.keep_monthly = Some(1),
            |p| p.keep_yearly = Some(1),
        ];
        for set in rules {
            let p = policy(set);
            assert_eq!(kept(&p, &backups), vec![20], "policy {p}");
        }
    }

    #[test]
    fn policy_parses_from_toml_kebab_case() {
        #[derive(Deserialize)]
        struct Image {
            retention: RetentionPolicy,
        }
        let image: Image =
            toml::from_str("retention = { keep-last = 3, keep-daily = 7 }").expect("parse");
        assert_eq!(
            image.retention,
            RetentionPolicy {
                keep_last: Some(3),
                keep_daily: Some(7),
                ..RetentionPolicy::default()
            }
        );
        assert_eq!(image.retention.to_string(), "keep-last=3, keep-daily=7");

        let bad = toml::from_str::<Image>("retention = { keep-lats = 3 }");
        assert!(bad.is_err(), "unknown keys must be rejected");
        let negative = toml::from_str::<Image>("retention = { keep-last = -1 }");
        assert!(negative.is_err(), "negative counts must be rejected");
        let empty: Image = toml::from_str("retention = {}").expect("parse");
        assert!(empty.retention.is_empty());
        assert_eq!(empty.retention.to_string(), "keep all");
    }

    #[test]
    fn dry_run_rendering() {
        let backups = [
            backup(41, at(2026, 11, 20, 2, 0)),
            backup(42, at(2026, 11, 20, 14, 0)),
        ];
        let items = plan(&policy(|p| p.keep_daily = Some(7)), &backups);
        assert_eq!(
            items[0].to_string(),
            "keep   #42    2026-11-20 14:00:00  keep-daily 2026-11-20 (1/7)"
        );
        assert_eq!(items[1].to_string(), "remove #41    2026-11-20 02:00:00");
        assert_eq!(
            render_plan(&items).to_string(),
            "keep   #42    2026-11-20 14:00:00  keep-daily 2026-11-20 (1/7)\n\
             remove #41    2026-11-20 02:00:00\n\
             1 kept, 1 to remove\n"
        );
    }
}
