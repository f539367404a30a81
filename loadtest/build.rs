// The same rpath as the jetbatch binary, for the same reason.
include!("../build.rs");
