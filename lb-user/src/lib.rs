//! The load balancer's control plane: configuration, Maglev tables, reconciliation of the
//! desired state into the XDP program's maps, and the `lb` commands built on them.

pub mod admin;
pub mod backend_agent;
pub mod config;
pub mod dataplane;
pub mod discovery;
pub mod ha;
pub mod health;
pub mod host;
pub mod maglev;
pub mod reconcile;
pub mod run;
pub mod status;
pub mod status_view;
