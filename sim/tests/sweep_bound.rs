//! A world found outside the suite (issue 20) that broke the sweep bound with no fault active:
//! `spawner-sim --seed 2750159 --users 3000` left slab-d42s663vw2mghiz4-0, idle since 122.5 s
//! with a 5 s grace period, Ready at 129.52 s. The sweeper sealed its sidecar at 127.58 s, but
//! the Swept write failed (`client error (SendRequest)`: the request went out on a pooled API
//! server connection that had been idle for nearly the kube client's read timeout, which then
//! closed it — the read timer of kube-rs's connector runs while a connection waits in the pool),
//! and the sweeper only tried again on the sidecar's next report, up to a heartbeat (5 s)
//! later. It now retries a failed seal or Swept write after 250 ms, backing off to a heartbeat.
//!
//! One world in this process, on a fresh thread, so it runs exactly as the binary does.

spawner_sim::install_entropy_hook!();

#[test]
fn world_2750159_with_3000_users_sweeps_every_idle_backend_on_time() {
    let config = spawner_sim::scenario::world(2_750_159, 3_000, 0);
    let result = std::thread::spawn(move || spawner_sim::world::run(config))
        .join()
        .expect("world thread");
    match result {
        Ok(summary) => {
            println!("{summary}");
            assert_eq!(summary.users.sessions, 3_000, "{summary}");
            assert_eq!(summary.failed, 0, "{summary}");
        }
        Err(failure) => panic!("{failure}"),
    }
}
