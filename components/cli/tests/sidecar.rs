//! `spawner sidecar`, the process every backend pod runs, as a separate process: it serves,
//! proxies, guards its event stream and drains on SIGTERM. (Its behaviour in depth is tested in
//! `components/sidecar/tests` on the library.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{SPAWNER, free_port};

const PATIENCE: Duration = Duration::from_secs(20);

/// An application answering every request with `hello from the app`, keeping connections alive.
fn start_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_app(stream));
        }
    });
    addr
}

fn serve_app(stream: TcpStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        // A request head (the sidecar's probe and bodyless requests send no body).
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
        }
        let body = "hello from the app";
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// One `GET` on a fresh connection: the status and the body.
fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The child process, killed if the test ends before it exited.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_serves_and_drains_on_sigterm() {
    let app = start_app();
    let port = free_port();
    let mut child = KillOnDrop(
        Command::new(SPAWNER)
            .arg("sidecar")
            .env("SPAWNER_SERVE_PORT", port.to_string())
            .env("SPAWNER_SERVE_ADDRESS", "127.0.0.1")
            .env("SPAWNER_UPSTREAM_PORT", app.port().to_string())
            .env("SPAWNER_EVENTS_TOKEN", "abc")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn `spawner sidecar`"),
    );
    let child = &mut child.0;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if matches!(fetch(addr, "/_spawner/health"), Ok((200, _))) {
            break;
        }
        assert!(Instant::now() < deadline, "binary never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fetch(addr, "/hello").unwrap().1, "hello from the app");
    assert_eq!(fetch(addr, "/_spawner/events").unwrap().0, 401);
    // SAFETY: kill(2) on our own child's pid.
    let killed = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(killed, 0);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
