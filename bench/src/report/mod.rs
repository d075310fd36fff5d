//! Rendering results: the Markdown sections of docs/BENCHMARKS.md, and the console tables of
//! the commands whose tables share code with them. Nothing here measures, and no measuring
//! module depends on this one (only `standard` and `main`, which hand results over).

pub mod control_plane;
pub mod dataplane;
pub mod markdown;
pub mod tunnel;
