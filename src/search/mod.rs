//! Search over a DB: exact nearest neighbours ([`index`]), near-duplicate groups ([`duplicates`]), the seed's test stage ([`query`]:
//! embed query images with the DB's model and rank), and retrieval metrics ([`eval`]). Uses
//! [`crate::render`], [`crate::store`], [`crate::infer`] and below.

pub mod ann;
pub mod duplicates;
pub mod eval;
pub mod index;
pub mod query;
