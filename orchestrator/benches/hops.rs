//! Hop overhead over moto SQS (filled in below in a later commit).
fn main() {}
