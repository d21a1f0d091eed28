//! Results: one JSON line per scenario and system on stdout as it finishes,
//! and at the end a table per scenario with Herald's figure as a ratio to
//! Socket.IO's.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::nodes::System;

/// The measurements of one scenario on one system.
pub struct Report {
    pub scenario: String,
    pub system: System,
    /// `(name, value)` in print order; names carry their unit.
    pub metrics: Vec<(&'static str, f64)>,
    /// Why a run could not complete, if it could not.
    pub error: Option<String>,
}

impl Report {
    pub fn new(scenario: impl Into<String>, system: System) -> Report {
        Report {
            scenario: scenario.into(),
            system,
            metrics: Vec::new(),
            error: None,
        }
    }

    pub fn set(&mut self, name: &'static str, value: f64) {
        self.metrics.push((name, value));
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    pub fn json_line(&self) -> String {
        let mut map = Map::new();
        map.insert("scenario".into(), self.scenario.clone().into());
        map.insert("system".into(), self.system.name().into());
        for (name, value) in &self.metrics {
            let value = if value.fract() == 0.0 && value.abs() < 1e15 {
                Value::from(*value as i64)
            } else {
                Value::from((value * 1000.0).round() / 1000.0)
            };
            map.insert((*name).into(), value);
        }
        if let Some(error) = &self.error {
            map.insert("error".into(), error.clone().into());
        }
        Value::Object(map).to_string()
    }
}

/// The value at quantile `q` (0..=1) of sorted `values`.
pub fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

/// Adds p50/p90/p99/max of latencies in microseconds, as milliseconds.
pub fn latencies(report: &mut Report, mut micros: Vec<u32>) {
    micros.sort_unstable();
    report.set("p50_ms", quantile(&micros, 0.50) / 1000.0);
    report.set("p90_ms", quantile(&micros, 0.90) / 1000.0);
    report.set("p99_ms", quantile(&micros, 0.99) / 1000.0);
    report.set("max_ms", quantile(&micros, 1.0) / 1000.0);
}

/// The end-of-run table: one block per scenario, a column per system and,
/// when both ran, Herald ÷ Socket.IO.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    let mut scenarios: Vec<&str> = Vec::new();
    for r in reports {
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
    }
    for scenario in scenarios {
        let runs: Vec<&Report> = reports.iter().filter(|r| r.scenario == scenario).collect();
        let _ = write!(out, "\n{scenario:<28}");
        for r in &runs {
            let _ = write!(out, "{:>14}", r.system.name());
        }
        let herald = runs.iter().find(|r| r.system == System::Herald);
        let socketio = runs.iter().find(|r| r.system == System::SocketIo);
        let ratio = herald.is_some() && socketio.is_some();
        if ratio {
            let _ = write!(out, "{:>18}", "herald/socketio");
        }
        out.push('\n');
        let mut names: Vec<&str> = Vec::new();
        for r in &runs {
            for (n, _) in &r.metrics {
                if !names.contains(n) {
                    names.push(n);
                }
            }
        }
        for name in names {
            let _ = write!(out, "  {name:<26}");
            for r in &runs {
                match r.get(name) {
                    Some(v) => {
                        let _ = write!(out, "{:>14}", format_value(v));
                    }
                    None => {
                        let _ = write!(out, "{:>14}", "-");
                    }
                }
            }
            if ratio {
                let h = herald.and_then(|r| r.get(name));
                let s = socketio.and_then(|r| r.get(name));
                match (h, s) {
                    (Some(h), Some(s)) if s != 0.0 && h.is_finite() && s.is_finite() => {
                        let _ = write!(out, "{:>17.2}x", h / s);
                    }
                    _ => {
                        let _ = write!(out, "{:>18}", "-");
                    }
                }
            }
            out.push('\n');
        }
        for r in &runs {
            if let Some(e) = &r.error {
                let _ = writeln!(out, "  {} error: {e}", r.system.name());
            }
        }
    }
    out
}

fn format_value(v: f64) -> String {
    if (v.fract() == 0.0 && v.abs() < 1e12) || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_ranks() {
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&sorted, 0.5), 50.0);
        assert_eq!(quantile(&sorted, 0.99), 99.0);
        assert_eq!(quantile(&sorted, 1.0), 100.0);
        assert_eq!(quantile(&[7], 0.0), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
