//! Requests waiting for the engine, served fairly across departments.
//!
//! Each department waits in its own line; free slots go round the departments in turn,
//! each taking as many requests per round as its weight (deficit round robin). A
//! department that floods the engine therefore delays another by at most one round, and
//! it may hold at most its share of the waiting places, so it cannot fill the queue and
//! leave the others only 503s.

use std::collections::{BTreeMap, VecDeque};

/// Waiting requests of type `T`, by department.
#[derive(Debug)]
pub struct FairQueue<T> {
    lines: BTreeMap<String, Line<T>>,
    /// Departments in round order (those with requests waiting).
    round: VecDeque<String>,
    weights: BTreeMap<String, u32>,
    capacity: usize,
    per_department: usize,
    len: usize,
}

#[derive(Debug)]
struct Line<T> {
    waiting: VecDeque<T>,
    /// Requests the department may still take in this round.
    credit: u32,
}

/// Why a request cannot wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// Every waiting place is taken.
    Engine,
    /// The department holds its whole share of the places.
    Department,
}

impl<T> FairQueue<T> {
    /// A queue of `capacity` places, of which one department may hold `per_department`;
    /// `weights` gives departments more turns per round (default 1).
    pub fn new(capacity: usize, per_department: usize, weights: BTreeMap<String, u32>) -> Self {
        Self {
            lines: BTreeMap::new(),
            round: VecDeque::new(),
            weights,
            capacity: capacity.max(1),
            per_department: per_department.clamp(1, capacity.max(1)),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn weight(&self, department: &str) -> u32 {
        self.weights.get(department).copied().unwrap_or(1).max(1)
    }

    /// Queues `item` for `department`, or says why it cannot wait.
    pub fn push(&mut self, department: &str, item: T) -> Result<(), (QueueFull, T)> {
        if self.len >= self.capacity {
            return Err((QueueFull::Engine, item));
        }
        let weight = self.weight(department);
        let line = self
            .lines
            .entry(department.to_owned())
            .or_insert_with(|| Line {
                waiting: VecDeque::new(),
                credit: weight,
            });
        if line.waiting.len() >= self.per_department {
            return Err((QueueFull::Department, item));
        }
        if line.waiting.is_empty() {
            self.round.push_back(department.to_owned());
        }
        line.waiting.push_back(item);
        self.len += 1;
        Ok(())
    }

    /// The next request to serve: from the department whose turn it is.
    pub fn pop(&mut self) -> Option<T> {
        loop {
            let department = self.round.front()?.clone();
            let weight = self.weight(&department);
            let Some(line) = self.lines.get_mut(&department) else {
                self.round.pop_front();
                continue;
            };
            if line.credit == 0 {
                // Its turn is over: to the back of the round, with a fresh allowance.
                line.credit = weight;
                self.round.rotate_left(1);
                continue;
            }
            let Some(item) = line.waiting.pop_front() else {
                self.round.pop_front();
                continue;
            };
            line.credit -= 1;
            self.len -= 1;
            if line.waiting.is_empty() {
                line.credit = weight;
                self.round.pop_front();
            }
            return Some(item);
        }
    }

    /// Drops every waiting request `keep` says no to (clients that left).
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut removed = 0;
        for line in self.lines.values_mut() {
            let before = line.waiting.len();
            line.waiting.retain(&mut keep);
            removed += before - line.waiting.len();
        }
        self.len -= removed;
        let lines = &self.lines;
        self.round
            .retain(|d| lines.get(d).is_some_and(|l| !l.waiting.is_empty()));
    }

    /// Every waiting request, emptying the queue.
    pub fn drain(&mut self) -> Vec<T> {
        self.round.clear();
        self.len = 0;
        std::mem::take(&mut self.lines)
            .into_values()
            .flat_map(|line| line.waiting)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(capacity: usize, per_department: usize) -> FairQueue<(char, u32)> {
        FairQueue::new(capacity, per_department, BTreeMap::new())
    }

    fn order(queue: &mut FairQueue<(char, u32)>) -> String {
        std::iter::from_fn(|| queue.pop()).map(|(d, _)| d).collect()
    }

    #[test]
    fn a_flooding_department_delays_another_by_one_turn_at_most() {
        let mut q = queue(64, 64);
        for n in 0..20 {
            q.push("a", ('a', n)).expect("room");
        }
        q.push("b", ('b', 0)).expect("room");
        q.push("c", ('c', 0)).expect("room");
        assert_eq!(order(&mut q), format!("abc{}", "a".repeat(19)));
    }

    #[test]
    fn each_department_keeps_its_own_order() {
        let mut q = queue(64, 64);
        for n in 0..3 {
            q.push("a", ('a', n)).expect("room");
            q.push("b", ('b', n)).expect("room");
        }
        let served: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        let a: Vec<u32> = served.iter().filter(|s| s.0 == 'a').map(|s| s.1).collect();
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(served.len(), 6);
    }

    #[test]
    fn weights_give_more_turns_per_round() {
        let weights = BTreeMap::from([("a".to_owned(), 3)]);
        let mut q = FairQueue::new(64, 64, weights);
        for n in 0..6 {
            q.push("a", ('a', n)).expect("room");
            q.push("b", ('b', n)).expect("room");
        }
        assert_eq!(order(&mut q), "aaabaaabbbbb");
    }

    #[test]
    fn a_department_cannot_take_every_place() {
        let mut q = queue(8, 4);
        for n in 0..4 {
            q.push("a", ('a', n)).expect("room");
        }
        assert_eq!(
            q.push("a", ('a', 4)).map_err(|e| e.0),
            Err(QueueFull::Department)
        );
        for n in 0..4 {
            q.push("b", ('b', n)).expect("its own share");
        }
        assert_eq!(
            q.push("c", ('c', 0)).map_err(|e| e.0),
            Err(QueueFull::Engine)
        );
        assert_eq!(q.len(), 8);
    }

    #[test]
    fn leaving_clients_free_their_places() {
        let mut q = queue(8, 8);
        for n in 0..4 {
            q.push("a", ('a', n)).expect("room");
        }
        q.push("b", ('b', 0)).expect("room");
        q.retain(|item| item.1 % 2 == 1 && item.0 == 'a');
        assert_eq!(q.len(), 2);
        assert_eq!(order(&mut q), "aa");
        assert!(q.is_empty());
    }
}
