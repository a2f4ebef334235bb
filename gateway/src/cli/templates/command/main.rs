//! A Gigafactory function as a plain program (a `wasi:cli` command): the
//! request body on stdin, its method, path and headers in the environment
//! (CGI), the response on stdout: headers, a blank line, the body.

use std::io::Read;

fn main() {
    let mut body = String::new();
    std::io::stdin()
        .read_to_string(&mut body)
        .expect("reading the request body");
    let path = std::env::var("PATH_INFO").unwrap_or_default();
    // Goes to the function's log (`gigafactory logs NAME`).
    eprintln!("{path}: {} bytes in", body.len());
    print!("Content-Type: text/plain; charset=utf-8\n\n");
    println!("You asked for {path} and sent {} bytes", body.len());
}
