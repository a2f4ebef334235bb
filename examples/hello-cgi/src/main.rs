//! The hello function as a plain program, as written for any CGI or WAGI
//! host: the request in the environment (and the body on stdin), the
//! response on stdout (a header block, a blank line, the body). Built for
//! wasm32-wasip2 it is a `wasi:cli` command component; for wasm32-wasip1,
//! a WAGI core module. Gigafactory serves both.

fn main() {
    let path = std::env::var("PATH_INFO").unwrap_or_default();
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    let asked = if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    };
    print!(
        "Content-Type: text/plain; charset=utf-8\n\nHello from Gigafactory! You asked for {asked}\n"
    );
    // Goes to the function's log.
    eprintln!("hello served {asked}");
}
