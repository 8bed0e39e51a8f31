//! Best and median of a series, and the machine notes printed beside them.

use std::time::Duration;

/// The best and the median of a series; the upper median of an even count.
pub fn best_median(times: &[Duration]) -> Option<(Duration, Duration)> {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    Some((*sorted.first()?, sorted[sorted.len() / 2]))
}

/// "best 1.234 s, median 1.300 s of 3", or "1.234 s (1 run)".
pub fn describe(times: &[Duration]) -> String {
    match best_median(times) {
        None => "not run".to_string(),
        Some((best, _)) if times.len() == 1 => format!("{} (1 run)", secs(best)),
        Some((best, median)) => format!(
            "best {}, median {} of {}",
            secs(best),
            secs(median),
            times.len()
        ),
    }
}

pub fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

pub fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpus} x {model}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_and_median() {
        let ms = Duration::from_millis;
        assert_eq!(
            best_median(&[ms(30), ms(10), ms(20)]),
            Some((ms(10), ms(20)))
        );
        assert_eq!(best_median(&[ms(5), ms(9)]), Some((ms(5), ms(9))));
        assert_eq!(best_median(&[]), None);
        assert_eq!(describe(&[ms(1500)]), "1.500 s (1 run)");
        assert_eq!(
            describe(&[ms(2000), ms(1000), ms(3000)]),
            "best 1.000 s, median 2.000 s of 3"
        );
    }
}
