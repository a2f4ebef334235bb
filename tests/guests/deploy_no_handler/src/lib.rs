//! A library component: it exports neither an HTTP handler nor
//! `wasi:cli/run`, so nothing could call it and deploying it is refused.

#[unsafe(no_mangle)]
pub extern "C" fn add(a: i32, b: i32) -> i32 {
    a + b
}
