/* The test bed's sandbox (pause) image: sleeps until SIGTERM/SIGINT, reaps
 * children. Built static with gcc by scripts/build_images.py. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) { (void)sig; _exit(0); }
static void on_chld(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }

int main(void) {
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    signal(SIGCHLD, on_chld);
    for (;;) pause();
}
