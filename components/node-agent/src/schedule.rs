//! Which of the agent's nodes a pending pod goes to: pure functions, no I/O.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::status::is_terminal_phase;

/// How pending pods are spread over the agent's nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulingPolicy {
    /// The node with the fewest pods (ties go to the first such node).
    #[default]
    LeastLoaded,
    /// Each node in turn.
    RoundRobin,
}

/// A node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLoad {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Pods bound to the node that have not finished.
    pub pods: u32,
    pub max_pods: u32,
}

/// Whether `pod` waits for a scheduler named `scheduler_name`.
pub fn wants_scheduling(pod: &Pod, scheduler_name: &str) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.node_name.as_deref().is_none_or(str::is_empty)
        && spec
            .scheduler_name
            .as_deref()
            .unwrap_or("default-scheduler")
            == scheduler_name
        && pod.metadata.deletion_timestamp.is_none()
        && !is_terminal_phase(pod.status.as_ref().and_then(|s| s.phase.as_deref()))
}

/// Whether `pod` occupies a slot on its node.
pub fn counts_as_load(pod: &Pod) -> bool {
    !is_terminal_phase(pod.status.as_ref().and_then(|s| s.phase.as_deref()))
}

fn fits(pod: &Pod, node: &NodeLoad) -> bool {
    let selector_matches = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.as_ref())
        .is_none_or(|selector| {
            selector
                .iter()
                .all(|(key, value)| node.labels.get(key) == Some(value))
        });
    selector_matches && node.pods < node.max_pods
}

/// The index of the node `pod` goes to, or `None` when none fits (node selector, capacity).
/// `cursor` is the round-robin position; it advances past the chosen node.
pub fn choose_node(
    policy: SchedulingPolicy,
    pod: &Pod,
    nodes: &[NodeLoad],
    cursor: &mut usize,
) -> Option<usize> {
    match policy {
        SchedulingPolicy::LeastLoaded => nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| fits(pod, n))
            .min_by_key(|(i, n)| (n.pods, *i))
            .map(|(i, _)| i),
        SchedulingPolicy::RoundRobin => {
            let count = nodes.len();
            let chosen = (0..count)
                .map(|step| (*cursor + step) % count)
                .find(|&i| fits(pod, &nodes[i]))?;
            *cursor = (chosen + 1) % count;
            Some(chosen)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, pods: u32) -> NodeLoad {
        NodeLoad {
            name: name.into(),
            labels: BTreeMap::from([("kubernetes.io/hostname".into(), name.into())]),
            pods,
            max_pods: 3,
        }
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).unwrap()
    }

    #[test]
    fn least_loaded_picks_the_emptiest_fitting_node() {
        let p = pod(json!({"containers": []}));
        let mut cursor = 0;
        let nodes = [node("a", 2), node("b", 1), node("c", 1)];
        assert_eq!(
            choose_node(SchedulingPolicy::LeastLoaded, &p, &nodes, &mut cursor),
            Some(1)
        );
        let full = [node("a", 3), node("b", 3)];
        assert_eq!(
            choose_node(SchedulingPolicy::LeastLoaded, &p, &full, &mut cursor),
            None
        );
    }

    #[test]
    fn round_robin_takes_turns_and_skips_nodes_that_do_not_fit() {
        let p = pod(json!({"containers": []}));
        let nodes = [node("a", 0), node("b", 3), node("c", 0)];
        let mut cursor = 0;
        let picks: Vec<_> = (0..4)
            .map(|_| choose_node(SchedulingPolicy::RoundRobin, &p, &nodes, &mut cursor))
            .collect();
        assert_eq!(picks, vec![Some(0), Some(2), Some(0), Some(2)]);
    }

    #[test]
    fn node_selector_restricts_the_choice() {
        let p = pod(json!({"containers": [], "nodeSelector": {"kubernetes.io/hostname": "c"}}));
        let nodes = [node("a", 0), node("b", 0), node("c", 2)];
        let mut cursor = 0;
        assert_eq!(
            choose_node(SchedulingPolicy::LeastLoaded, &p, &nodes, &mut cursor),
            Some(2)
        );
        let elsewhere = pod(json!({"containers": [], "nodeSelector": {"zone": "mars"}}));
        assert_eq!(
            choose_node(
                SchedulingPolicy::RoundRobin,
                &elsewhere,
                &nodes,
                &mut cursor
            ),
            None
        );
    }

    #[test]
    fn only_unbound_live_pods_for_this_scheduler_wait() {
        assert!(wants_scheduling(
            &pod(json!({"containers": []})),
            "default-scheduler"
        ));
        assert!(!wants_scheduling(
            &pod(json!({"containers": [], "nodeName": "a"})),
            "default-scheduler"
        ));
        assert!(!wants_scheduling(
            &pod(json!({"containers": [], "schedulerName": "other"})),
            "default-scheduler"
        ));
    }
}
