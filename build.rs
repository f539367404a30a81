// Embeds the libtorch library directory as an rpath so `jetbatch` and its test binaries (and
// `jetbatch-loadtest`, whose build script includes this file) find `libtorch*.so` without the user
// setting `LD_LIBRARY_PATH`. torch-sys reports the directory it linked against through the
// `links = "tch"` metadata key.
//
// Before it, `$ORIGIN/../lib/jetbatch`: the install layout (`make install PREFIX=…`,
// scripts/install.sh) puts libtorch there beside `bin/jetbatch`, and cuts the build tree's entry
// out of the installed copy, so an installed binary loads only what was installed with it.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../lib/jetbatch");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-env=JETBATCH_LIBTORCH_LIB={dir}");
    }
}
