//! Stitcher ingestion: webhook deliveries (processed exactly once) and manual dispatch,
//! both turning into QUEUED jobs.
pub mod model;
pub mod repo;
pub mod routes;
