//! The hostile function's attacks as a command (WAGI) program: plain
//! `main`, the request in its environment and stdin, stdout the response.
//! By `PATH_INFO`:
//!
//! - `/loop`: spins forever
//! - `/grow-forever`: allocates until memory runs out
//! - `/recurse`: recurses without bound
//! - `/trap-before`: panics before writing anything
//! - `/trap-after`: writes a header block and some body, then panics
//! - `/spam?mb=N`: writes 2N MiB to stderr, then answers
//! - `/endless`: writes to stdout forever
//! - `/read-forever`: reads stdin until it ends, then answers its size
//! - anything else: `fine`

#[path = "../../hostile/src/attacks.rs"]
mod attacks;

use std::io::{Read, Write};

fn main() {
    let path = std::env::var("PATH_INFO").unwrap_or_default();
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    let mut stdout = std::io::stdout();
    match path.as_str() {
        "/loop" => attacks::spin(),
        "/grow-forever" => attacks::grow_forever(),
        "/recurse" => {
            std::hint::black_box(attacks::recurse(0));
        }
        "/trap-before" => panic!("trapping before the response"),
        "/trap-after" => {
            stdout
                .write_all(b"Content-Type: text/plain\n\npartial")
                .unwrap();
            stdout.flush().unwrap();
            panic!("trapping after the response started");
        }
        "/spam" => {
            let mb: usize = query
                .strip_prefix("mb=")
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            // 64 lines of 1 KiB a write.
            let lines: Vec<u8> = (0..64)
                .flat_map(|_| [[b'x'; 1023].as_slice(), b"\n"].concat())
                .collect();
            let mut stderr = std::io::stderr();
            for _ in 0..mb * 32 {
                let _ = stderr.write_all(&lines);
            }
            print!("Content-Type: text/plain\n\nspammed");
        }
        "/endless" => {
            let chunk = [b'y'; 65536];
            while stdout.write_all(&chunk).is_ok() {}
        }
        "/read-forever" => {
            let mut total = 0usize;
            let mut buffer = [0u8; 4096];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                total += n;
            }
            print!("read {total}");
        }
        _ => print!("fine"),
    }
}
