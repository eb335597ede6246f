//! Which queued task runs next: the highest priority level that waits, with a bound on how long a
//! lower level waits behind higher ones, and within a level the clients (API keys) in turn.
//!
//! The embedded queue keeps its waiting tasks in a [`Schedule`]; the Redis queue applies the same
//! rules in its `claim.lua` and rebuilds a [`Schedule`] from Redis to tell a task's place.

use std::collections::{HashMap, VecDeque};

use crate::core::Priority;

/// Higher-level tasks that may start while a lower level waits before that level gets a turn,
/// when `--starvation-bound` is not given.
pub const DEFAULT_STARVATION_BOUND: u32 = 10;

/// The tasks waiting at one priority level: each client's in the order they came, and the clients
/// in the order of their turns.
#[derive(Debug, Clone, Default)]
struct Level {
    turns: VecDeque<String>,
    waiting: HashMap<String, VecDeque<String>>,
}

impl Level {
    fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    fn push(&mut self, client: &str, task_id: String) {
        let queue = self.waiting.entry(client.to_string()).or_default();
        if queue.is_empty() {
            self.turns.push_back(client.to_string());
        }
        queue.push_back(task_id);
    }

    /// The next client's first task; the client goes to the back of the turns if it has more.
    fn pop(&mut self) -> Option<String> {
        let client = self.turns.pop_front()?;
        let queue = self.waiting.get_mut(&client).expect("a client with a turn has tasks");
        let task_id = queue.pop_front().expect("a client with a turn has tasks");
        if queue.is_empty() {
            self.waiting.remove(&client);
        } else {
            self.turns.push_back(client);
        }
        Some(task_id)
    }

    /// Puts a task back where it was popped from: first, with its client's turn next.
    fn unpop(&mut self, client: &str, task_id: String) {
        let queue = self.waiting.entry(client.to_string()).or_default();
        if !queue.is_empty() {
            self.turns.retain(|c| c != client);
        }
        queue.push_front(task_id);
        self.turns.push_front(client.to_string());
    }

    fn remove(&mut self, task_id: &str) -> bool {
        let Some((client, queue)) = self.waiting.iter_mut().find(|(_, q)| q.iter().any(|id| id == task_id))
        else {
            return false;
        };
        queue.retain(|id| id != task_id);
        if queue.is_empty() {
            let client = client.clone();
            self.waiting.remove(&client);
            self.turns.retain(|c| *c != client);
        }
        true
    }

    fn len(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }
}

/// The waiting tasks of every level, and how often each level was passed over.
#[derive(Debug, Clone)]
pub struct Schedule {
    levels: [Level; 3],
    /// Tasks of higher levels started while each level waited, since it last had a turn.
    passed: [u32; 3],
    bound: u32,
}

impl Schedule {
    /// An empty schedule in which a waiting level gets a turn at the latest after `bound` tasks of
    /// higher levels started (0 is taken as 1).
    pub fn new(bound: u32) -> Schedule {
        Schedule { levels: Default::default(), passed: [0; 3], bound: bound.max(1) }
    }

    /// A schedule as the Redis queue keeps it: per level, the clients in turn order with their
    /// tasks, and the passed-over counts.
    pub fn from_parts(bound: u32, levels: [Vec<(String, Vec<String>)>; 3], passed: [u32; 3]) -> Schedule {
        let mut schedule = Schedule::new(bound);
        schedule.passed = passed;
        for (level, clients) in schedule.levels.iter_mut().zip(levels) {
            for (client, tasks) in clients {
                for task_id in tasks {
                    level.push(&client, task_id);
                }
            }
        }
        schedule
    }

    /// Queues a task behind the others of its client at its level.
    pub fn push(&mut self, priority: Priority, client: &str, task_id: String) {
        self.levels[priority.rank()].push(client, task_id);
    }

    /// Takes the task that runs next.
    pub fn pop(&mut self) -> Option<String> {
        let rank = self.next_level()?;
        let task_id = self.levels[rank].pop();
        self.passed[rank] = 0;
        for lower in rank + 1..self.levels.len() {
            if !self.levels[lower].is_empty() {
                self.passed[lower] += 1;
            }
        }
        task_id
    }

    /// Puts back the task [`Schedule::pop`] just took, as if it had not been taken (the
    /// passed-over counts stay).
    pub fn unpop(&mut self, priority: Priority, client: &str, task_id: String) {
        self.levels[priority.rank()].unpop(client, task_id);
    }

    /// Drops a waiting task; false when it was not waiting.
    pub fn remove(&mut self, task_id: &str) -> bool {
        self.levels.iter_mut().any(|level| level.remove(task_id))
    }

    /// Tasks waiting.
    pub fn len(&self) -> usize {
        self.levels.iter().map(Level::len).sum()
    }

    /// True when no task waits.
    pub fn is_empty(&self) -> bool {
        self.levels.iter().all(Level::is_empty)
    }

    /// Where a waiting task stands: 1 when it runs next, given what waits now.
    pub fn position(&self, task_id: &str) -> Option<usize> {
        let (rank, client) = self.levels.iter().enumerate().find_map(|(rank, level)| {
            let (client, _) = level.waiting.iter().find(|(_, queue)| queue.iter().any(|id| id == task_id))?;
            Some((rank, client.as_str()))
        })?;
        self.position_at(task_id, Priority::ALL[rank], client)
    }

    /// [`Schedule::position`] of a task known to have been queued at `priority` by `client`:
    /// only that client's tasks at that level are looked through. The pops before it are counted
    /// without copying a task id: per level, the clients in turn with how many tasks each has.
    pub fn position_at(&self, task_id: &str, priority: Priority, client: &str) -> Option<usize> {
        let rank = priority.rank();
        let mut before = self.levels[rank].waiting.get(client)?.iter().position(|id| id == task_id)?;
        let mut turns: [VecDeque<(&str, usize)>; 3] = std::array::from_fn(|r| {
            let level = &self.levels[r];
            level.turns.iter().map(|c| (c.as_str(), level.waiting[c].len())).collect()
        });
        let mut passed = self.passed;
        for popped in 1.. {
            let waiting = |turns: &[VecDeque<(&str, usize)>; 3], r: usize| !turns[r].is_empty();
            let level = (0..turns.len())
                .filter(|&r| waiting(&turns, r))
                .find(|&r| passed[r] >= self.bound)
                .or_else(|| (0..turns.len()).find(|&r| waiting(&turns, r)))?;
            let (next, left) = turns[level].pop_front().expect("a waiting level has a client in turn");
            if level == rank && next == client {
                if before == 0 {
                    return Some(popped);
                }
                before -= 1;
            }
            if left > 1 {
                turns[level].push_back((next, left - 1));
            }
            passed[level] = 0;
            for (lower, count) in passed.iter_mut().enumerate().skip(level + 1) {
                if waiting(&turns, lower) {
                    *count += 1;
                }
            }
        }
        None
    }

    /// The level served next: the highest waiting level passed over `bound` times, else the
    /// highest waiting level.
    fn next_level(&self) -> Option<usize> {
        let waiting = |rank: &usize| !self.levels[*rank].is_empty();
        (0..self.levels.len())
            .filter(waiting)
            .find(|rank| self.passed[*rank] >= self.bound)
            .or_else(|| (0..self.levels.len()).find(waiting))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(schedule: &mut Schedule) -> Vec<String> {
        std::iter::from_fn(|| schedule.pop()).collect()
    }

    #[test]
    fn higher_levels_run_first_and_each_level_in_order() {
        let mut schedule = Schedule::new(10);
        schedule.push(Priority::Low, "", "low-1".into());
        schedule.push(Priority::Normal, "", "normal-1".into());
        schedule.push(Priority::Low, "", "low-2".into());
        schedule.push(Priority::High, "", "high-1".into());
        schedule.push(Priority::Normal, "", "normal-2".into());
        assert_eq!(schedule.len(), 5);
        assert_eq!(drain(&mut schedule), ["high-1", "normal-1", "normal-2", "low-1", "low-2"]);
        assert!(schedule.is_empty());
    }

    #[test]
    fn clients_at_one_level_take_turns() {
        let mut schedule = Schedule::new(10);
        for n in 1..=4 {
            schedule.push(Priority::Normal, "flood", format!("f{n}"));
        }
        schedule.push(Priority::Normal, "other", "o1".into());
        schedule.push(Priority::Normal, "other", "o2".into());
        assert_eq!(drain(&mut schedule), ["f1", "o1", "f2", "o2", "f3", "f4"]);
    }

    #[test]
    fn a_passed_over_level_gets_a_turn_within_the_bound() {
        let mut schedule = Schedule::new(3);
        schedule.push(Priority::Low, "", "low".into());
        for n in 1..=7 {
            schedule.push(Priority::High, "", format!("h{n}"));
        }
        schedule.push(Priority::Normal, "", "normal".into());
        assert_eq!(drain(&mut schedule), ["h1", "h2", "h3", "normal", "low", "h4", "h5", "h6", "h7"]);
    }

    #[test]
    fn a_level_is_passed_over_only_while_it_waits() {
        let mut schedule = Schedule::new(2);
        for n in 1..=3 {
            schedule.push(Priority::High, "", format!("h{n}"));
        }
        assert_eq!(schedule.pop().as_deref(), Some("h1"));
        assert_eq!(schedule.pop().as_deref(), Some("h2"));
        schedule.push(Priority::Low, "", "low".into());
        schedule.push(Priority::High, "", "h4".into());
        schedule.push(Priority::High, "", "h5".into());
        assert_eq!(drain(&mut schedule), ["h3", "h4", "low", "h5"]);
    }

    #[test]
    fn position_is_the_order_the_tasks_would_run_in() {
        let mut schedule = Schedule::new(10);
        schedule.push(Priority::Low, "a", "low".into());
        schedule.push(Priority::Normal, "a", "a1".into());
        schedule.push(Priority::Normal, "a", "a2".into());
        schedule.push(Priority::Normal, "b", "b1".into());
        assert_eq!(schedule.position("a1"), Some(1));
        assert_eq!(schedule.position("b1"), Some(2));
        assert_eq!(schedule.position("a2"), Some(3));
        assert_eq!(schedule.position("low"), Some(4));
        assert_eq!(schedule.position("gone"), None);
        assert_eq!(schedule.len(), 4, "telling a place takes nothing off the queue");
        assert_eq!(schedule.position_at("a2", Priority::Normal, "a"), Some(3));
        assert_eq!(schedule.position_at("a2", Priority::Normal, "b"), None, "not that client's");
    }

    #[test]
    fn positions_agree_with_the_order_tasks_are_taken_in_past_the_starvation_bound() {
        let mut schedule = Schedule::new(2);
        for i in 0..6 {
            schedule.push(Priority::High, if i % 2 == 0 { "a" } else { "b" }, format!("high-{i}"));
            schedule.push(Priority::Normal, "a", format!("normal-{i}"));
        }
        schedule.push(Priority::Low, "c", "low".into());
        let order = drain(&mut schedule.clone());
        for (place, task_id) in order.iter().enumerate() {
            assert_eq!(schedule.position(task_id), Some(place + 1), "{task_id} in {order:?}");
        }
    }

    #[test]
    fn a_removed_task_is_skipped_and_an_unpopped_one_runs_next() {
        let mut schedule = Schedule::new(10);
        schedule.push(Priority::Normal, "a", "a1".into());
        schedule.push(Priority::Normal, "a", "a2".into());
        schedule.push(Priority::Normal, "b", "b1".into());
        assert!(schedule.remove("a2"));
        assert!(!schedule.remove("a2"));
        let first = schedule.pop().unwrap();
        schedule.unpop(Priority::Normal, "a", first);
        assert_eq!(drain(&mut schedule), ["a1", "b1"]);
    }

    #[test]
    fn a_schedule_rebuilt_from_its_parts_runs_the_same() {
        let levels = [
            vec![("a".to_string(), vec!["h1".to_string()])],
            vec![],
            vec![("a".to_string(), vec!["l1".to_string()]), ("b".to_string(), vec!["l2".to_string()])],
        ];
        let mut schedule = Schedule::from_parts(2, levels, [0, 0, 2]);
        assert_eq!(drain(&mut schedule), ["l1", "h1", "l2"]);
    }
}
