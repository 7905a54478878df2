/* Holds MEMHOG_MB MiB (default 64): the first MEMHOG_RANDOM_PCT percent
 * (default 50) incompressible, the rest a compressible pattern; every page
 * touched. Prints "ready <MB>", then once a second increments a counter,
 * prints "count <n>", writes it to MEMHOG_COUNTER_FILE (default
 * /tmp/count) and flips word <n> of its memory with it. The counter lives
 * in memory, so a restore that resumes from the checkpointed value proves
 * the memory came back.
 *
 * SIGUSR1 makes it check every word of its memory against what it must
 * hold (the generated contents and the flips so far) and print
 * "verify ok <words> at count <n>" or "verify BAD word <i> ...": a restore
 * that brought back a page wrong, or not at all, is caught to the word. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long env_long(const char *name, long def) {
    const char *v = getenv(name);
    return v && *v ? strtol(v, 0, 10) : def;
}

static volatile sig_atomic_t verify_requested;

static void on_usr1(int sig) {
    (void)sig;
    verify_requested = 1;
}

/* Word i of the memory as generated, before any flip. */
struct gen { uint64_t x; size_t i, random_words; };

static uint64_t gen_next(struct gen *g) {
    uint64_t v;
    if (g->i < g->random_words) {
        g->x ^= g->x << 13; g->x ^= g->x >> 7; g->x ^= g->x << 17;
        v = g->x;
    } else {
        v = 0x0123456789abcdefULL + (g->i & 0xff);
    }
    g->i++;
    return v;
}

static void verify(const uint64_t *mem, size_t words, size_t random_words, uint64_t seed,
                   uint64_t counter) {
    if (counter >= words) {
        printf("verify skipped: count %llu wrapped around %zu words\n",
               (unsigned long long)counter, words);
        fflush(stdout);
        return;
    }
    struct gen g = { seed, 0, random_words };
    for (size_t i = 0; i < words; i++) {
        uint64_t want = gen_next(&g);
        if (i >= 1 && i <= counter) want ^= i;  /* the flips of counts 1..n */
        if (mem[i] != want) {
            printf("verify BAD word %zu: %016llx, want %016llx (count %llu)\n", i,
                   (unsigned long long)mem[i], (unsigned long long)want,
                   (unsigned long long)counter);
            fflush(stdout);
            return;
        }
    }
    printf("verify ok %zu at count %llu\n", words, (unsigned long long)counter);
    fflush(stdout);
}

int main(void) {
    long mb = env_long("MEMHOG_MB", 64);
    long pct = env_long("MEMHOG_RANDOM_PCT", 50);
    const char *path = getenv("MEMHOG_COUNTER_FILE");
    if (!path || !*path) path = "/tmp/count";
    size_t size = (size_t)mb << 20;
    uint64_t *mem = malloc(size ? size : 1);
    if (!mem) { perror("malloc"); return 1; }
    size_t words = size / 8, random_words = words * (size_t)pct / 100;
    uint64_t seed = 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();
    struct gen g = { seed, 0, random_words };
    for (size_t i = 0; i < words; i++) mem[i] = gen_next(&g);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    printf("ready %ld\n", mb);
    fflush(stdout);
    volatile uint64_t counter = 0;
    for (;;) {
        if (verify_requested) {
            verify_requested = 0;
            verify(mem, words, random_words, seed, counter);
        }
        counter++;
        printf("count %llu\n", (unsigned long long)counter);
        fflush(stdout);
        FILE *f = fopen(path, "w");
        if (f) { fprintf(f, "%llu\n", (unsigned long long)counter); fclose(f); }
        mem[counter % (words ? words : 1)] ^= counter;
        sleep(1);
    }
}
