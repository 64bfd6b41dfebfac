//! A full world: backends wait for pod slots most of the run, and no node ever gets more pods
//! bound than it has slots (kube-scheduler's capacity rule, checked at every step). One world
//! in this process, on a fresh thread, so it runs exactly as `spawner-sim --seed 1 --users 200
//! --slots 4` does.

spawner_sim::install_entropy_hook!();

#[test]
fn a_full_world_never_binds_a_node_past_its_capacity() {
    // 200 users of the dense workload on 2 nodes of 4 slots: the node agents mark waiting pods
    // Unschedulable and bind them as slots free up. Before the agents kept their own bindings
    // against older watch events (another agent's Unschedulable mark arriving after the
    // binding), this world bound a fifth pod to node-1 at 35.9 s.
    let mut config = spawner_sim::scenario::world(1, 200, 0);
    config.slots_per_node = 4;
    // Full on purpose: users give up waiting for a slot (asserted below).
    config.allowed_user_failures = None;
    let result = std::thread::spawn(move || spawner_sim::world::run(config))
        .join()
        .expect("world thread");
    match result {
        Ok(summary) => {
            println!("{summary}");
            assert!(
                summary.users.ready_timeouts > 0,
                "the world is full: {summary}"
            );
            assert_eq!(summary.failed, 0, "no pod failed for a slot: {summary}");
        }
        Err(failure) => panic!("{failure}"),
    }
}
