//! The backend `just bench-spawn` measures with: binds its port at once and answers every
//! request with a short 200, on the standard library alone, so a spawn's time is Spawner's and
//! not the backend's start (a process on an async runtime costs more to start than the whole
//! spawn path's share of some steps). Usage: `bind_at_once [port]`, else `$PORT`, else 8080.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};

fn answer(mut stream: TcpStream) {
    // One request per connection is enough for a benchmark backend.
    let mut head = [0u8; 4096];
    if stream.read(&mut head).is_ok() {
        let _ = stream.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\
              connection: close\r\n\r\nok\n",
        );
    }
}

fn main() -> std::io::Result<()> {
    let port = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("PORT").ok())
        .unwrap_or_else(|| "8080".into());
    let port: u16 = port
        .parse()
        .map_err(|_| std::io::Error::other(format!("not a port: {port:?}")))?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind 127.0.0.1:{port}: {e}")))?;
    for stream in listener.incoming().flatten() {
        answer(stream);
    }
    Ok(())
}
