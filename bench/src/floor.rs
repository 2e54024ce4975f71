//! The engine's floors for a cold build with `--load` (issue 18):
//! - by time: no builder outside the engine can have the image there before each layer
//!   exists and the engine has taken it and every layer above it (the engine registers a
//!   pull's layers in order, one after another): [`import_floor`];
//! - by work: on a machine of `n` cores, no build and import can end before the CPU time
//!   they need together, divided by `n` ([`busy_cpu_secs`] measures it machine-wide).

/// The earliest the engine can hold an image whose top layers, bottom to top, became
/// final at `final_at` seconds and take the engine `import` seconds each by themselves:
/// the largest, over the layers, of when one was final plus the imports of it and of every
/// layer above it. `None` when the two lists differ in length or are empty.
pub fn import_floor(final_at: &[f64], import: &[f64]) -> Option<f64> {
    if final_at.is_empty() || final_at.len() != import.len() {
        return None;
    }
    let mut above = 0.0;
    let mut floor: f64 = 0.0;
    for (t, l) in final_at.iter().zip(import).rev() {
        above += l;
        floor = floor.max(t + above);
    }
    Some(floor)
}

/// CPU-seconds the whole machine has been busy since boot (user, nice, system, irq,
/// softirq and steal time of `/proc/stat`; not idle or iowait). The difference over an
/// interval is the work done in it, on every core.
pub fn busy_cpu_secs() -> Option<f64> {
    busy_of(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// [`busy_cpu_secs`] of the text of `/proc/stat`, whose times are in 1/100 s (USER_HZ).
fn busy_of(stat: &str) -> Option<f64> {
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = cpu.split_whitespace().skip(1).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    let busy = [0, 1, 2, 5, 6, 7].iter().map(|&i| f.get(i).copied().unwrap_or(0)).sum::<u64>();
    Some(busy as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_counts_work_not_idle_or_waiting() {
        let stat = "cpu  1000 50 300 90000 700 10 20 5 0 0\ncpu0 500 25 150 45000 350 5 10 2 0 0\n";
        assert_eq!(busy_of(stat), Some(13.85));
        assert_eq!(busy_of("intr 1 2 3\n"), None);
        assert!(busy_cpu_secs().is_some_and(|s| s > 0.0), "this machine's /proc/stat");
    }

    #[test]
    fn the_floor_is_the_latest_layer_plus_the_imports_above_it() {
        // A big layer final early, imported slowly, and a small one at the end: the big
        // one's import (and the small one's after it) bounds the load.
        assert_eq!(import_floor(&[2.0, 5.0], &[4.0, 0.5]), Some(6.5));
        // The last layer final late dominates.
        assert_eq!(import_floor(&[1.0, 9.0], &[1.0, 2.0]), Some(11.0));
        assert_eq!(import_floor(&[1.0], &[]), None);
        assert_eq!(import_floor(&[], &[]), None);
    }
}
