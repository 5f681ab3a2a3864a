//! stub

pub mod autoscale;
pub mod export;

pub mod asl;
pub mod pipeline;
