//! Pictures: the bitmap font ([`font`]), result grids drawn from plain rows ([`grid`]) and the
//! training plot ([`plot`]). Uses [`crate::data`] only (to load thumbnails).

pub mod font;
pub mod grid;
pub mod plot;
