//! podckpt-runc: the OCI runtime wrapper. Configure the container runtime
//! to use it in place of runc; it hands everything to the real runc except
//! the create and start of containers podckptd registered for restore. See
//! [`podckpt::restore::wrapper`].

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    std::process::exit(podckpt::restore::wrapper::run(args));
}
