//! Pod status as the kubelet reports it, computed from what the agent knows about each
//! container: pure functions, no I/O.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_RUNNING: &str = "Running";
pub const PHASE_SUCCEEDED: &str = "Succeeded";
pub const PHASE_FAILED: &str = "Failed";

/// Whether a pod phase is final.
pub fn is_terminal_phase(phase: Option<&str>) -> bool {
    matches!(phase, Some(PHASE_SUCCEEDED | PHASE_FAILED))
}

/// What the agent knows about one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerRecord {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        id: String,
        started_at: Timestamp,
        ready: bool,
    },
    Terminated {
        id: Option<String>,
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
    },
}

impl ContainerRecord {
    pub fn is_terminated(&self) -> bool {
        matches!(self, ContainerRecord::Terminated { .. })
    }

    pub fn is_running(&self) -> bool {
        matches!(self, ContainerRecord::Running { .. })
    }

    /// The record of a container that stopped running with `exit_code`.
    pub fn exited(
        previous: &ContainerRecord,
        exit_code: i32,
        signal: Option<i32>,
        message: Option<String>,
        now: Timestamp,
    ) -> ContainerRecord {
        let (id, started_at) = match previous {
            ContainerRecord::Running { id, started_at, .. } => {
                (Some(id.clone()), Some(*started_at))
            }
            ContainerRecord::Terminated { id, started_at, .. } => (id.clone(), *started_at),
            ContainerRecord::Waiting { .. } => (None, None),
        };
        ContainerRecord::Terminated {
            id,
            exit_code,
            signal,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
            message,
            started_at,
            finished_at: now,
        }
    }
}

/// One container of the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    /// The injected sidecar: like a Kubernetes native sidecar it does not decide the phase.
    pub is_sidecar: bool,
    pub record: ContainerRecord,
}

/// The containers that decide the pod's phase: all but the sidecar (or all, if the sidecar
/// is alone).
fn deciding(containers: &[ContainerView]) -> impl Iterator<Item = &ContainerView> {
    let only_sidecars = containers.iter().all(|c| c.is_sidecar);
    containers
        .iter()
        .filter(move |c| only_sidecars || !c.is_sidecar)
}

/// Whether every container that decides the phase has terminated.
pub fn workload_finished(containers: &[ContainerView]) -> bool {
    deciding(containers).all(|c| c.record.is_terminated())
}

/// The pod phase for `restartPolicy: Never`.
pub fn pod_phase(containers: &[ContainerView], pod_failed: bool) -> &'static str {
    if pod_failed {
        return PHASE_FAILED;
    }
    if containers.is_empty() {
        return PHASE_PENDING;
    }
    if workload_finished(containers) {
        let all_zero = deciding(containers)
            .all(|c| matches!(c.record, ContainerRecord::Terminated { exit_code: 0, .. }));
        return if all_zero {
            PHASE_SUCCEEDED
        } else {
            PHASE_FAILED
        };
    }
    if containers
        .iter()
        .any(|c| !matches!(c.record, ContainerRecord::Waiting { .. }))
    {
        PHASE_RUNNING
    } else {
        PHASE_PENDING
    }
}

/// A condition with the time its status last changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionRecord {
    pub type_: &'static str,
    pub status: bool,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub last_transition: Timestamp,
}

/// The pod's conditions, keeping transition times across updates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    items: Vec<ConditionRecord>,
}

impl Conditions {
    /// Set a condition; its transition time only moves when its status changes.
    pub fn set(
        &mut self,
        type_: &'static str,
        status: bool,
        reason: Option<String>,
        message: Option<String>,
        now: Timestamp,
    ) {
        match self.items.iter_mut().find(|c| c.type_ == type_) {
            Some(existing) => {
                if existing.status != status {
                    existing.last_transition = now;
                }
                existing.status = status;
                existing.reason = reason;
                existing.message = message;
            }
            None => self.items.push(ConditionRecord {
                type_,
                status,
                reason,
                message,
                last_transition: now,
            }),
        }
    }

    pub fn get(&self, type_: &str) -> Option<&ConditionRecord> {
        self.items.iter().find(|c| c.type_ == type_)
    }

    fn to_api(&self) -> Vec<PodCondition> {
        self.items
            .iter()
            .map(|c| PodCondition {
                type_: c.type_.into(),
                status: if c.status { "True" } else { "False" }.into(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                last_transition_time: Some(Time(c.last_transition)),
                ..Default::default()
            })
            .collect()
    }
}

/// Everything the status of one pod is computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    pub containers: Vec<ContainerView>,
    pub conditions: Conditions,
    pub host_ip: String,
    pub pod_ip: Option<String>,
    pub start_time: Option<Timestamp>,
    /// A pod-level failure (the pod could not run at all, or its node shut down).
    pub failure: Option<(String, String)>,
}

fn time(t: Timestamp) -> Option<Time> {
    Some(Time(t))
}

impl PodRecord {
    pub fn phase(&self) -> &'static str {
        pod_phase(&self.containers, self.failure.is_some())
    }

    /// Recompute the conditions that follow from the containers (Initialized,
    /// ContainersReady, Ready) at `now`.
    pub fn refresh_conditions(&mut self, now: Timestamp) {
        let phase = self.phase();
        let terminal = is_terminal_phase(Some(phase));
        if self.pod_ip.is_some() {
            self.conditions
                .set("PodReadyToStartContainers", !terminal, None, None, now);
        }
        self.conditions.set("Initialized", true, None, None, now);
        let unready: Vec<&str> = self
            .containers
            .iter()
            .filter(|c| !matches!(c.record, ContainerRecord::Running { ready: true, .. }))
            .map(|c| c.name.as_str())
            .collect();
        let (ready, reason, message) = if terminal {
            (false, Some("PodCompleted".to_string()), None)
        } else if unready.is_empty() {
            (true, None, None)
        } else {
            (
                false,
                Some("ContainersNotReady".to_string()),
                Some(format!(
                    "containers with unready status: [{}]",
                    unready.join(" ")
                )),
            )
        };
        self.conditions.set(
            "ContainersReady",
            ready,
            reason.clone(),
            message.clone(),
            now,
        );
        self.conditions.set("Ready", ready, reason, message, now);
    }

    /// The status subresource as the kubelet writes it.
    pub fn to_status(&self) -> PodStatus {
        let container_statuses = self
            .containers
            .iter()
            .map(|c| {
                let (state, ready, started, container_id) = match &c.record {
                    ContainerRecord::Waiting { reason, message } => (
                        ContainerState {
                            waiting: Some(ContainerStateWaiting {
                                reason: Some(reason.clone()),
                                message: message.clone(),
                            }),
                            ..Default::default()
                        },
                        false,
                        false,
                        None,
                    ),
                    ContainerRecord::Running {
                        id,
                        started_at,
                        ready,
                    } => (
                        ContainerState {
                            running: Some(ContainerStateRunning {
                                started_at: time(*started_at),
                            }),
                            ..Default::default()
                        },
                        *ready,
                        true,
                        Some(id.clone()),
                    ),
                    ContainerRecord::Terminated {
                        id,
                        exit_code,
                        signal,
                        reason,
                        message,
                        started_at,
                        finished_at,
                    } => (
                        ContainerState {
                            terminated: Some(ContainerStateTerminated {
                                container_id: id.clone(),
                                exit_code: *exit_code,
                                signal: *signal,
                                reason: Some(reason.clone()),
                                message: message.clone(),
                                started_at: started_at.map(Time),
                                finished_at: time(*finished_at),
                            }),
                            ..Default::default()
                        },
                        false,
                        false,
                        id.clone(),
                    ),
                };
                ContainerStatus {
                    name: c.name.clone(),
                    image: c.image.clone(),
                    image_id: String::new(),
                    container_id,
                    ready,
                    started: Some(started),
                    restart_count: 0,
                    state: Some(state),
                    ..Default::default()
                }
            })
            .collect();
        let (reason, message) = match &self.failure {
            Some((reason, message)) => (Some(reason.clone()), Some(message.clone())),
            None => (None, None),
        };
        PodStatus {
            phase: Some(self.phase().into()),
            conditions: Some(self.conditions.to_api()),
            container_statuses: Some(container_statuses),
            host_ip: Some(self.host_ip.clone()),
            host_ips: Some(vec![HostIP {
                ip: self.host_ip.clone(),
            }]),
            pod_ip: self.pod_ip.clone(),
            pod_ips: self
                .pod_ip
                .as_ref()
                .map(|ip| vec![PodIP { ip: ip.clone() }]),
            start_time: self.start_time.map(Time),
            reason,
            message,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn view(name: &str, sidecar: bool, record: ContainerRecord) -> ContainerView {
        ContainerView {
            name: name.into(),
            image: String::new(),
            is_sidecar: sidecar,
            record,
        }
    }

    fn running(ready: bool) -> ContainerRecord {
        ContainerRecord::Running {
            id: "spawner-process://1".into(),
            started_at: t(0),
            ready,
        }
    }

    fn exited(code: i32) -> ContainerRecord {
        ContainerRecord::exited(&running(true), code, None, None, t(5))
    }

    #[test]
    fn phase_follows_the_application_not_the_sidecar() {
        let waiting = ContainerRecord::Waiting {
            reason: "ContainerCreating".into(),
            message: None,
        };
        let cases = [
            (vec![view("app", false, waiting.clone())], PHASE_PENDING),
            (
                vec![view("app", false, running(false)), view("s", true, waiting)],
                PHASE_RUNNING,
            ),
            (
                vec![
                    view("app", false, exited(0)),
                    view("s", true, running(true)),
                ],
                PHASE_SUCCEEDED,
            ),
            (
                vec![
                    view("app", false, exited(3)),
                    view("s", true, running(true)),
                ],
                PHASE_FAILED,
            ),
            (
                vec![
                    view("app", false, running(true)),
                    view("s", true, exited(1)),
                ],
                PHASE_RUNNING,
            ),
            (vec![view("s", true, exited(0))], PHASE_SUCCEEDED),
        ];
        for (containers, expected) in cases {
            assert_eq!(pod_phase(&containers, false), expected, "{containers:?}");
        }
        assert_eq!(
            pod_phase(&[view("a", false, running(true))], true),
            PHASE_FAILED
        );
    }

    #[test]
    fn status_reports_exit_codes_and_ready_conditions_with_transition_times() {
        let mut record = PodRecord {
            containers: vec![view("app", false, running(false))],
            conditions: Conditions::default(),
            host_ip: "127.0.0.1".into(),
            pod_ip: Some("127.1.0.3".into()),
            start_time: Some(t(0)),
            failure: None,
        };
        record.refresh_conditions(t(1));
        assert!(!record.conditions.get("Ready").unwrap().status);
        record.containers[0].record = running(true);
        record.refresh_conditions(t(2));
        record.refresh_conditions(t(3));
        let ready = record.conditions.get("Ready").unwrap();
        assert!(ready.status);
        assert_eq!(ready.last_transition, t(2));

        record.containers[0].record = exited(137);
        record.refresh_conditions(t(4));
        let status = serde_json::to_value(record.to_status()).unwrap();
        assert_eq!(status["phase"], "Failed");
        assert_eq!(status["podIP"], "127.1.0.3");
        let terminated = &status["containerStatuses"][0]["state"]["terminated"];
        assert_eq!(terminated["exitCode"], 137);
        assert_eq!(terminated["reason"], "Error");
        let ready = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .unwrap();
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "PodCompleted");
    }
}
