pub mod agent; pub mod cli; pub mod cluster;
