//! Search over a DB: exact nearest neighbours ([`index`]), near-duplicate groups ([`duplicates`]), the seed's test stage ([`query`]:
//! embed query images with the DB's model and rank), retrieval metrics ([`eval`]), and search of a
//! PostgreSQL store ranked by the exact search's own distance ([`pg`]). Uses
//! [`crate::render`], [`crate::store`], [`crate::infer`] and below.

pub mod ann;
pub mod duplicates;
pub mod eval;
pub mod index;
pub mod pg;
pub mod query;
