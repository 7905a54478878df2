/* Holds MEMHOG_MB MiB (default 64): the first MEMHOG_RANDOM_PCT percent
 * (default 50) incompressible, the rest a compressible pattern; every page
 * touched. Prints "ready <MB>", then once a second increments a counter,
 * prints "count <n>" and writes it to MEMHOG_COUNTER_FILE (default
 * /tmp/count). The counter lives in memory, so a restore that resumes from
 * the checkpointed value proves the memory came back. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long env_long(const char *name, long def) {
    const char *v = getenv(name);
    return v && *v ? strtol(v, 0, 10) : def;
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
    uint64_t x = 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();
    for (size_t i = 0; i < random_words; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        mem[i] = x;
    }
    for (size_t i = random_words; i < words; i++) mem[i] = 0x0123456789abcdefULL + (i & 0xff);
    printf("ready %ld\n", mb);
    fflush(stdout);
    volatile uint64_t counter = 0;
    for (;;) {
        counter++;
        printf("count %llu\n", (unsigned long long)counter);
        fflush(stdout);
        FILE *f = fopen(path, "w");
        if (f) { fprintf(f, "%llu\n", (unsigned long long)counter); fclose(f); }
        mem[counter % (words ? words : 1)] ^= counter;
        sleep(1);
    }
}
