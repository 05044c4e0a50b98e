//! Which processors ONNX Runtime's worker threads are pinned to.
//!
//! Pinning each intra-op worker to its own processor keeps the scheduler from moving it
//! between steps. On a 2-core machine it made a Python onnxruntime loop about 8% faster,
//! while the engine's own benchmark showed no difference beyond noise, so it is opt-in
//! (`engine.pin_threads`) for machines where it measures better. The processors
//! come from the set this process may run on (`Cpus_allowed_list`, which honours cgroup
//! cpusets and `CPUAffinity=`), so a restricted service never pins outside its set.

/// Parses a Linux CPU list such as `0-3,8,10-11` into processor ids, ascending.
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (usize, usize) = (first.parse().ok()?, last.parse().ok()?);
                if last < first || last - first > 4096 {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// The processors this process may run on, if the kernel says.
pub fn allowed_cpus() -> Option<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))?;
    parse_cpu_list(list)
}

/// ONNX Runtime's `session.intra_op_thread_affinities` value for a pool of `threads`
/// threads: one entry per worker (the calling thread is the pool's first thread and stays
/// unpinned), each a 1-based processor id, leaving the first allowed processor to the
/// caller. `None` when there is nothing to pin or too few processors.
pub fn intra_op_affinities(threads: usize, allowed: &[usize]) -> Option<String> {
    if threads < 2 || allowed.len() < threads {
        return None;
    }
    let ids: Vec<String> = allowed[1..threads]
        .iter()
        .map(|cpu| (cpu + 1).to_string())
        .collect();
    Some(ids.join(";"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn workers_get_the_processors_after_the_callers() {
        assert_eq!(intra_op_affinities(2, &[0, 1]), Some("2".to_owned()));
        assert_eq!(
            intra_op_affinities(3, &[4, 5, 6, 7]),
            Some("6;7".to_owned())
        );
        assert_eq!(intra_op_affinities(1, &[0, 1]), None);
        assert_eq!(intra_op_affinities(4, &[0, 1]), None);
    }
}
