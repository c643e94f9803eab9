/* The lexical stage's n-gram counts in C: the matrix `hashing.py` builds in numpy (which stays,
 * as the fallback where this module was not compiled), made one text at a time. And, from the
 * same code that splits a text into words here, the verdict cache's normalised form of a text
 * (`normalised`, for `cache.normalise`); and a linear head's scores of such a matrix without its
 * dense weight vector (`linear_scores`, for `stage._Weights`, numpy's product the fallback), or
 * of the texts without the matrix (`text_scores`, for the cascade's decisions).
 *
 * Python side (`hashing._compiled_counts`) hands over the texts lower-cased: an ASCII text as it
 * comes (most chat is; lower-casing it takes nothing beyond A-Z, done here), any other through
 * str.lower(). Here each is read as the n-grams are read from: its words joined by single spaces
 * and padded with a space either side (`padded`). With them come three buffers Python owns: int32
 * column indices and float64 values, each with room for 5 entries per character of a padded
 * text (a text of L characters has at most L word 1-2-grams and 4 L character 2-5-grams), and
 * int32 row pointers, one per text and one more (int32 as scipy keeps them for a matrix this
 * size: given int64, its constructor reads them all to check they fit and copies them). This
 * fills them as scipy's CSR matrix reads them (each row's columns in order, each once) and
 * returns how many entries it wrote.
 *
 * The hashes are the numpy code's, bit for bit: the polynomial hash of an n-gram's code points
 * (h = h * P + c, modulo 2**64), MurmurHash3's 64-bit finaliser, the low bits as the column.
 * Word n-grams fill [0, n_features), character n-grams [n_features, 2 n_features); each block
 * of a row is l2-normalised on its own. The GIL is released while the counts are made.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define P 0x100000001B3ULL /* FNV-1's 64-bit prime, as in hashing.py */
#define ENTRIES_A_CHARACTER 5
#define MAX_DIGIT_BITS 8
#define MAX_PASSES 4 /* of keys below 2**31 */
#define INSERTION_SORT_BELOW 48

typedef struct {
    int kind;
    const void *data;
    Py_ssize_t length;
} Text;

static inline uint64_t mixed(uint64_t h) {
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDULL;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ULL;
    h ^= h >> 33;
    return h;
}

/* A character of a `(?u)\b\w+\b` word: str.isalnum() or "_", as the `re` module tells them. */
static inline int is_word(Py_UCS4 c) {
    if (c < 128)
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    return Py_UNICODE_ISALNUM(c);
}

/* Ascending order. A row of a chat message holds some 250 columns below 2**18: a least
 * significant digit radix sort beats a comparison sort there, its digits as narrow as passes of
 * at most 8 bits allow (18 bits: three passes of 6, over 64 buckets each, rather than two over
 * 512: at this size the buckets' prefix sums cost more than the keys' moves). Every pass's
 * buckets are counted in one read of the keys. Tiny rows take an insertion sort. */
static void sort_columns(uint32_t *keys, uint32_t *scratch, Py_ssize_t n, int bits) {
    if (n < INSERTION_SORT_BELOW) {
        for (Py_ssize_t i = 1; i < n; i++) {
            uint32_t key = keys[i];
            Py_ssize_t j = i;
            for (; j > 0 && keys[j - 1] > key; j--)
                keys[j] = keys[j - 1];
            keys[j] = key;
        }
        return;
    }
    const int passes = (bits + MAX_DIGIT_BITS - 1) / MAX_DIGIT_BITS, digit = (bits + passes - 1) / passes;
    const uint32_t buckets = 1u << digit, mask = buckets - 1;
    Py_ssize_t starts[MAX_PASSES][1 << MAX_DIGIT_BITS];
    for (int p = 0; p < passes; p++)
        memset(starts[p], 0, sizeof(Py_ssize_t) * buckets);
    for (Py_ssize_t i = 0; i < n; i++)
        for (int p = 0; p < passes; p++)
            starts[p][(keys[i] >> (p * digit)) & mask]++;
    uint32_t *from = keys, *to = scratch;
    for (int p = 0; p < passes; p++) {
        Py_ssize_t *at = starts[p], sum = 0;
        for (uint32_t d = 0; d < buckets; d++) {
            Py_ssize_t count = at[d];
            at[d] = sum;
            sum += count;
        }
        const int shift = p * digit;
        for (Py_ssize_t i = 0; i < n; i++)
            to[at[(from[i] >> shift) & mask]++] = from[i];
        uint32_t *swap = from;
        from = to;
        to = swap;
    }
    if (from != keys)
        memcpy(keys, from, (size_t)n * sizeof *keys);
}

/* A text as `hashing._padded` makes it, from a text whose letters other than A-Z are lower-cased
 * already (ASCII text comes as it is; other text as str.lower() made it: Unicode's full mapping,
 * which the C API does not offer): A-Z lower-cased, its words (split where str.split() splits:
 * Py_UNICODE_ISSPACE, which in ASCII is also \x1c-\x1f) joined by single spaces, a space either
 * side; "" when it has no words. `out` has room for its length + 2 characters of its kind.
 * Inlined into `padded` for each kind, so that the reads and writes are of one width. */
static inline __attribute__((always_inline)) Text padded_kind(const Text *text, void *out, int kind) {
    const void *in = text->data;
    Py_ssize_t size = 0;
    int in_a_word = 0;
    for (Py_ssize_t i = 0; i < text->length; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, in, i);
        if (Py_UNICODE_ISSPACE(c)) {
            in_a_word = 0;
            continue;
        }
        if (!in_a_word)
            PyUnicode_WRITE(kind, out, size++, ' '); /* before every word: the padding, then one between each two */
        in_a_word = 1;
        PyUnicode_WRITE(kind, out, size++, (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c);
    }
    if (size)
        PyUnicode_WRITE(kind, out, size++, ' ');
    Text padded = {kind, out, size};
    return padded;
}

static Text padded(const Text *text, void *out) {
    switch (text->kind) {
    case PyUnicode_1BYTE_KIND:
        return padded_kind(text, out, PyUnicode_1BYTE_KIND);
    case PyUnicode_2BYTE_KIND:
        return padded_kind(text, out, PyUnicode_2BYTE_KIND);
    default:
        return padded_kind(text, out, PyUnicode_4BYTE_KIND);
    }
}

/* One text's columns, unsorted, into `row`: its word n-grams, then (from *words on) its character
 * n-grams; returns how many in all. */
static Py_ssize_t ngram_columns(const Text *text, uint32_t n_features, uint32_t *row, Py_ssize_t *words) {
    const int kind = text->kind;
    const void *data = text->data;
    const Py_ssize_t size = text->length;
    const uint32_t mask = n_features - 1;
    Py_ssize_t m = 0;
    /* Word unigrams, and each bigram "w1 w2" (one space between, whatever stood there):
     * h(w1) * P**(1 + |w2|) + ord(" ") * P**|w2| + h(w2). */
    uint64_t previous = 0;
    int after_a_word = 0;
    for (Py_ssize_t i = 0; i < size;) {
        if (!is_word(PyUnicode_READ(kind, data, i))) {
            i++;
            continue;
        }
        uint64_t h = 0, power = 1;
        for (; i < size; i++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            if (!is_word(c))
                break;
            h = h * P + c;
            power *= P;
        }
        row[m++] = (uint32_t)(mixed(h) & mask);
        if (after_a_word)
            row[m++] = (uint32_t)(mixed(previous * power * P + (uint64_t)' ' * power + h) & mask);
        previous = h;
        after_a_word = 1;
    }
    *words = m;
    /* Character 2-5-grams inside word boundaries: no space inside a span (its first and last
     * characters apart), so a padded word shorter than n counts once whole. */
    for (Py_ssize_t start = 0; start + 1 < size; start++) {
        uint64_t h = PyUnicode_READ(kind, data, start);
        for (Py_ssize_t k = 1; k < 5 && start + k < size; k++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, start + k);
            h = h * P + c;
            row[m++] = (uint32_t)(mixed(h) & mask) + n_features;
            if (c == ' ')
                break; /* inside every longer span from here */
        }
    }
    return m;
}

/* 0 where n_features is a power of two up to 2**30, else -1 with a ValueError set. */
static int n_features_checked(Py_ssize_t n_features) {
    if (n_features < 1 || n_features > (1 << 30) || (n_features & (n_features - 1))) {
        PyErr_Format(PyExc_ValueError, "n_features must be a power of two up to 2**30, not %zd", n_features);
        return -1;
    }
    return 0;
}

/* The list's texts as the code here reads them (PyMem_RawFree it), each checked to be a str; with
 * *longest the longest padded text's length and *padded all padded texts' lengths together. NULL
 * with an exception set where one is not a str (or no memory). */
static Text *texts_read(PyObject *texts, Py_ssize_t *longest, Py_ssize_t *padded) {
    const Py_ssize_t rows = PyList_GET_SIZE(texts);
    Text *read = PyMem_RawMalloc(sizeof(Text) * (size_t)(rows ? rows : 1));
    if (read == NULL)
        return (Text *)PyErr_NoMemory();
    *longest = *padded = 0;
    for (Py_ssize_t r = 0; r < rows; r++) {
        PyObject *item = PyList_GET_ITEM(texts, r);
        if (!PyUnicode_Check(item)) {
            PyErr_Format(PyExc_TypeError, "texts[%zd] is %.100s, not str", r, Py_TYPE(item)->tp_name);
            PyMem_RawFree(read);
            return NULL;
        }
        read[r] = (Text){PyUnicode_KIND(item), PyUnicode_DATA(item), PyUnicode_GET_LENGTH(item)};
        Py_ssize_t length = read[r].length + 2; /* padded */
        *padded += length;
        if (length > *longest)
            *longest = length;
    }
    return read;
}

/* counts(texts lower-cased but for A-Z, n_features, indices int32, data float64, indptr int32) -> entries */
static PyObject *counts(PyObject *self, PyObject *args) {
    PyObject *texts;
    Py_ssize_t n_features;
    Py_buffer indices = {0}, values = {0}, indptr = {0};
    if (!PyArg_ParseTuple(args, "O!nw*w*w*", &PyList_Type, &texts, &n_features, &indices, &values, &indptr))
        return NULL;
    PyObject *result = NULL;
    Text *read = NULL;
    uint32_t *scratch = NULL;
    const Py_ssize_t rows = PyList_GET_SIZE(texts);
    const Py_ssize_t capacity = indices.len / (Py_ssize_t)sizeof(int32_t);
    if (n_features_checked(n_features) < 0)
        goto done;
    if (values.len / (Py_ssize_t)sizeof(double) < capacity || indptr.len / (Py_ssize_t)sizeof(int32_t) < rows + 1) {
        PyErr_SetString(PyExc_ValueError, "the value or row-pointer buffer is shorter than the texts need");
        goto done;
    }
    Py_ssize_t longest, padded_lengths;
    read = texts_read(texts, &longest, &padded_lengths);
    if (read == NULL)
        goto done;
    const Py_ssize_t needed = ENTRIES_A_CHARACTER * padded_lengths;
    if (needed > capacity || needed > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "room for %zd entries (and int32 row pointers), the texts may need %zd",
                     capacity, needed);
        goto done;
    }
    /* The radix sort's scratch space, then room for one padded text (of 4-byte characters at most). */
    scratch = PyMem_RawMalloc(sizeof(uint32_t) * (size_t)(ENTRIES_A_CHARACTER * longest + 1 + longest));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int bits = 1;
    while (((uint64_t)2 * (uint64_t)n_features - 1) >> bits)
        bits++;
    uint32_t *columns = (uint32_t *)indices.buf;
    double *weights = (double *)values.buf;
    int32_t *starts = (int32_t *)indptr.buf;
    Py_ssize_t at = 0;
    Py_BEGIN_ALLOW_THREADS
    starts[0] = 0;
    void *text_space = scratch + ENTRIES_A_CHARACTER * longest + 1;
    for (Py_ssize_t r = 0; r < rows; r++) {
        uint32_t *row = columns + at;
        Text text = padded(&read[r], text_space);
        Py_ssize_t words, m = ngram_columns(&text, (uint32_t)n_features, row, &words);
        sort_columns(row, scratch, m, bits);
        /* Equal neighbours are one n-gram counted several times. */
        Py_ssize_t unique = 0;
        double squares[2] = {0.0, 0.0};
        for (Py_ssize_t j = 0; j < m;) {
            Py_ssize_t k = j + 1;
            while (k < m && row[k] == row[j])
                k++;
            double count = (double)(k - j);
            squares[row[j] >= (uint32_t)n_features] += count * count;
            row[unique] = row[j];
            weights[at + unique] = count;
            unique++;
            j = k;
        }
        double norms[2] = {sqrt(squares[0]), sqrt(squares[1])};
        for (Py_ssize_t j = 0; j < unique; j++)
            weights[at + j] /= norms[row[j] >= (uint32_t)n_features];
        at += unique;
        starts[r + 1] = (int32_t)at;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(at);
done:
    PyMem_RawFree(read);
    PyMem_RawFree(scratch);
    PyBuffer_Release(&indices);
    PyBuffer_Release(&values);
    PyBuffer_Release(&indptr);
    return result;
}

/* normalised(text) -> str: the verdict cache's form of a text (`cache.normalise`) from a text
 * case-folded already but for A-Z (ASCII text as it comes: case-folding ASCII is lower-casing it;
 * other text through NFKC and str.casefold() first): A-Z lower-cased and its words joined by
 * single spaces, made by `padded` without the padding. One pass and one string where Python's
 * split and join make a string a word: 0.8 against 1.3 µs a bench chat message. */
static PyObject *normalised(PyObject *self, PyObject *text) {
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "text is %.100s, not str", Py_TYPE(text)->tp_name);
        return NULL;
    }
    Text given = {PyUnicode_KIND(text), PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text)};
    size_t room = ((size_t)given.length + 2) * (size_t)given.kind;
    Py_UCS1 small[512];
    void *out = room <= sizeof small ? small : PyMem_Malloc(room);
    if (out == NULL)
        return PyErr_NoMemory();
    Text words = padded(&given, out);
    /* Without the space either side ("" stays ""); of the narrowest kind its characters allow
     * (white space taken out may have been the widest), as every str must be. */
    Py_ssize_t length = words.length ? words.length - 2 : 0;
    PyObject *result = PyUnicode_FromKindAndData(given.kind, (const char *)out + given.kind, length);
    if (out != small)
        PyMem_Free(out);
    return result;
}

/* The bits set in x, in a few instructions: for CPUs without the popcnt instruction (and
 * compilers that cannot ask for it), where __builtin_popcountll is a call into libgcc. */
static inline Py_ssize_t bits_set(uint64_t x) {
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (Py_ssize_t)((x * 0x0101010101010101ULL) >> 56);
}

/* A linear head as linear_scores takes it (see there). */
typedef struct {
    Py_ssize_t words, weights;
    const double *weight;
    const uint64_t *bits;
    const uint32_t *ranks;
} Head;

/* A column's weight in the head (0.0 where it has none), or 1 in *outside where the column or its
 * rank lies outside the head's arrays. Inlined, so that `hardware` is a constant in each caller. */
static inline __attribute__((always_inline)) double head_weight(const Head *h, uint32_t column, int hardware,
                                                                int *outside) {
    Py_ssize_t word = (Py_ssize_t)(column >> 6);
    if (word >= h->words) {
        *outside = 1;
        return 0.0;
    }
    uint64_t here = h->bits[word], below = here & ((1ULL << (column & 63)) - 1);
    Py_ssize_t at = (Py_ssize_t)h->ranks[word] + (hardware ? __builtin_popcountll(below) : bits_set(below));
    if (at >= h->weights) {
        *outside = 1;
        return 0.0;
    }
    /* Without a branch: two in three of a chat row's columns are the head's, a branch no CPU
     * predicts. A column that is not reads the next one's weight (or the 0.0 after the last) and
     * masks it to 0.0, which the dense product adds too. */
    uint64_t keep = (uint64_t)0 - ((here >> (column & 63)) & 1), value;
    memcpy(&value, &h->weight[at], sizeof value);
    value &= keep;
    double term;
    memcpy(&term, &value, sizeof term);
    return term;
}

typedef struct {
    Head head;
    Py_ssize_t rows;
    const int32_t *starts, *columns;
    const double *counts;
    double *scores;
} Product;

/* The rows' sums (see linear_scores); 1 if a column lies outside the head's. Inlined into both
 * callers below, so that `hardware` is a constant in each. */
static inline __attribute__((always_inline)) int sum_rows(const Product *p, int hardware) {
    int outside = 0;
    for (Py_ssize_t r = 0; r < p->rows; r++) {
        double sum = 0.0;
        for (int32_t j = p->starts[r]; j < p->starts[r + 1]; j++)
            sum += p->counts[j] * head_weight(&p->head, (uint32_t)p->columns[j], hardware, &outside);
        if (outside)
            return 1;
        p->scores[r] = sum;
    }
    return 0;
}

static int sum_rows_portable(const Product *p) { return sum_rows(p, 0); }

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
/* Built for the popcnt instruction and run only where the CPU has it (`has_popcnt`): about two
 * thirds of the portable loop's time on the lexical stage's rows (bench/lexical_features.py). */
__attribute__((target("popcnt"))) static int sum_rows_popcnt(const Product *p) { return sum_rows(p, 1); }
static int has_popcnt;
#define POPCNT_DISPATCH 1
#endif

static Head head_of(const Py_buffer *present, const Py_buffer *before, const Py_buffer *values) {
    Head h = {
        .words = present->len / (Py_ssize_t)sizeof(uint64_t),
        .weights = values->len / (Py_ssize_t)sizeof(double),
        .weight = (const double *)values->buf,
        .bits = (const uint64_t *)present->buf,
        .ranks = (const uint32_t *)before->buf,
    };
    return h;
}

/* linear_scores(indptr int32, indices int32, data float64, present uint64, before uint32,
 *               values float64, out float64[, portable]):
 * out[r] = row r of the CSR matrix times a linear head's weights, given as the head's non-zero
 * columns (`stage._Weights`): `present` has bit c set for each such column c, `before[w]` counts
 * those in the 64-bit words before word w, and `values` holds their weights in column order and
 * a 0.0 after them, so a column's weight is values[before[c / 64] + the bits of word c / 64 set
 * below bit c % 64] where its bit is set.
 * Why not the dense vector: the lexical stage's 262,144 columns make it 2 MB, past this
 * machine's L2, and it was filled and cleared at each call, a few thousand lines at random;
 * the bitmap and its counts are 48 KB. The sum runs over a row's entries in order, as scipy's
 * product does, a column without a weight adding 0.0: the same float64 result. The GIL is
 * released while the sums are made. `portable` true: without the popcnt instruction (tests).
 * int32 row pointers, as scipy keeps a matrix of fewer than 2**31 entries (`_Weights.scores`
 * sends any other to numpy's product). */
static PyObject *linear_scores(PyObject *self, PyObject *args) {
    Py_buffer indptr = {0}, indices = {0}, data = {0}, present = {0}, before = {0}, values = {0}, out = {0};
    int portable = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*w*|p", &indptr, &indices, &data, &present, &before, &values, &out,
                          &portable))
        return NULL;
    PyObject *result = NULL;
    Product p = {
        .head = head_of(&present, &before, &values),
        .rows = indptr.len / (Py_ssize_t)sizeof(int32_t) - 1,
        .starts = (const int32_t *)indptr.buf,
        .columns = (const int32_t *)indices.buf,
        .counts = (const double *)data.buf,
        .scores = (double *)out.buf,
    };
    const Py_ssize_t entries = indices.len / (Py_ssize_t)sizeof(int32_t);
    if (p.rows < 0 || out.len / (Py_ssize_t)sizeof(double) < p.rows ||
        data.len / (Py_ssize_t)sizeof(double) < entries || before.len / (Py_ssize_t)sizeof(uint32_t) < p.head.words) {
        PyErr_SetString(PyExc_ValueError, "linear_scores: the buffers' lengths do not match");
        goto done;
    }
    for (Py_ssize_t r = 0; r < p.rows; r++) {
        if (p.starts[r] < 0 || p.starts[r] > p.starts[r + 1] || p.starts[r + 1] > entries) {
            PyErr_SetString(PyExc_ValueError, "linear_scores: the row pointers are not ordered within the entries");
            goto done;
        }
    }
    int outside;
    Py_BEGIN_ALLOW_THREADS
#ifdef POPCNT_DISPATCH
    outside = has_popcnt && !portable ? sum_rows_popcnt(&p) : sum_rows_portable(&p);
#else
    outside = sum_rows_portable(&p);
#endif
    Py_END_ALLOW_THREADS
    if (outside)
        PyErr_SetString(PyExc_ValueError, "linear_scores: a column lies outside the head's columns");
    else
        result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&indptr);
    PyBuffer_Release(&indices);
    PyBuffer_Release(&data);
    PyBuffer_Release(&present);
    PyBuffer_Release(&before);
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    return result;
}

/* A column seen in the text being scored (`stamp`: that text's number + 1; older stamps are free
 * slots, so the table is cleared once per call, not once per text). */
typedef struct {
    uint32_t stamp, column, count;
} Seen;

/* How many times `column` was seen before in the text being scored, counting this once more. */
static inline __attribute__((always_inline)) uint32_t seen_before(Seen *table, uint32_t slots, uint32_t stamp,
                                                                  uint32_t column) {
    uint32_t slot = column & (slots - 1);
    while (table[slot].stamp == stamp && table[slot].column != column)
        slot = (slot + 1) & (slots - 1);
    if (table[slot].stamp != stamp) {
        table[slot].stamp = stamp;
        table[slot].column = column;
        table[slot].count = 0;
    }
    return table[slot].count++;
}

/* One block's part of a text's score (see text_scores): the weights of its n-grams' columns
 * summed, over the l2 norm of their counts. */
static inline __attribute__((always_inline)) double block_score(const Head *head, const uint32_t *columns,
                                                                Py_ssize_t n, Seen *table, uint32_t slots,
                                                                uint32_t stamp, int hardware, int *outside) {
    double sum = 0.0;
    uint64_t squares = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        squares += 2 * (uint64_t)seen_before(table, slots, stamp, columns[j]) + 1; /* (k + 1)**2 - k**2 */
        sum += head_weight(head, columns[j], hardware, outside);
    }
    return squares ? sum / sqrt((double)squares) : 0.0;
}

/* One text's score: its n-gram columns made in `row`, `table` of `slots` (a power of two, at
 * least twice the columns). */
static inline __attribute__((always_inline)) double text_score(const Head *head, const Text *text, uint32_t n_features,
                                                               uint32_t *row, Seen *table, uint32_t slots,
                                                               uint32_t stamp, int hardware, int *outside) {
    Py_ssize_t words, m = ngram_columns(text, n_features, row, &words);
    return block_score(head, row, words, table, slots, stamp, hardware, outside) +
           block_score(head, row + words, m - words, table, slots, stamp, hardware, outside);
}

typedef struct {
    Head head;
    const Text *texts;
    Py_ssize_t rows;
    uint32_t n_features, slots;
    uint32_t *row;
    Seen *table;
    void *text_space;
    double *scores;
} Scoring;

static inline __attribute__((always_inline)) int score_texts(const Scoring *s, int hardware) {
    int outside = 0;
    for (Py_ssize_t r = 0; r < s->rows; r++) {
        Text text = padded(&s->texts[r], s->text_space);
        s->scores[r] = text_score(&s->head, &text, s->n_features, s->row, s->table, s->slots, (uint32_t)r + 1,
                                  hardware, &outside);
        if (outside)
            return 1;
    }
    return 0;
}

static int score_texts_portable(const Scoring *s) { return score_texts(s, 0); }

#ifdef POPCNT_DISPATCH
__attribute__((target("popcnt"))) static int score_texts_popcnt(const Scoring *s) { return score_texts(s, 1); }
#endif

/* text_scores(texts lower-cased but for A-Z, n_features, present uint64, before uint32, values float64,
 *             out float64[, portable]):
 * out[i] = a linear head's score of text i's row of `counts` (the head as in linear_scores), without
 * the rows: per block (word n-grams, character n-grams), the sum of the head's weights of the
 * text's n-grams, each as often as it occurs, over the block's l2 norm, the sum of its columns'
 * squared counts, which a table of the columns seen so far in the text gives (a column seen k
 * times before adds 2 k + 1). No sort and no matrix: the cascade's decisions need the scores
 * only. The sums run in the n-grams' order rather than the columns', so a score may differ from
 * linear_scores's of the same row in its last bits. The GIL is released meanwhile. */
static PyObject *text_scores(PyObject *self, PyObject *args) {
    PyObject *texts;
    Py_ssize_t n_features;
    Py_buffer present = {0}, before = {0}, values = {0}, out = {0};
    int portable = 0;
    if (!PyArg_ParseTuple(args, "O!ny*y*y*w*|p", &PyList_Type, &texts, &n_features, &present, &before, &values, &out,
                          &portable))
        return NULL;
    PyObject *result = NULL;
    Text *read = NULL;
    void *space = NULL;
    Scoring s = {.head = head_of(&present, &before, &values), .rows = PyList_GET_SIZE(texts), .scores = out.buf};
    if (n_features_checked(n_features) < 0)
        goto done;
    if (out.len / (Py_ssize_t)sizeof(double) < s.rows || before.len / (Py_ssize_t)sizeof(uint32_t) < s.head.words) {
        PyErr_SetString(PyExc_ValueError, "text_scores: the buffers' lengths do not match");
        goto done;
    }
    Py_ssize_t longest, padded_lengths;
    read = texts_read(texts, &longest, &padded_lengths);
    if (read == NULL)
        goto done;
    if (ENTRIES_A_CHARACTER * longest > UINT32_MAX / 4 || s.rows >= UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "text_scores: a text is too long, or there are too many");
        goto done;
    }
    s.slots = 16;
    while (s.slots < 2 * ENTRIES_A_CHARACTER * (uint64_t)longest)
        s.slots *= 2;
    /* The table (zeroed: no stamp yet), then one text's columns, then one padded text (of 4-byte
     * characters at most). */
    size_t room = sizeof(uint32_t) * (size_t)(ENTRIES_A_CHARACTER * longest + longest);
    space = PyMem_RawCalloc(1, sizeof(Seen) * s.slots + room);
    if (space == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    s.texts = read;
    s.n_features = (uint32_t)n_features;
    s.table = space;
    s.row = (uint32_t *)(s.table + s.slots);
    s.text_space = s.row + ENTRIES_A_CHARACTER * longest;
    int outside;
    Py_BEGIN_ALLOW_THREADS
#ifdef POPCNT_DISPATCH
    outside = has_popcnt && !portable ? score_texts_popcnt(&s) : score_texts_portable(&s);
#else
    outside = score_texts_portable(&s);
#endif
    Py_END_ALLOW_THREADS
    if (outside)
        PyErr_SetString(PyExc_ValueError, "text_scores: a column lies outside the head's columns");
    else
        result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(read);
    PyMem_RawFree(space);
    PyBuffer_Release(&present);
    PyBuffer_Release(&before);
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"counts", counts, METH_VARARGS,
     "counts(texts, n_features, indices, data, indptr) -> entries written (see hashing.py)"},
    {"linear_scores", linear_scores, METH_VARARGS,
     "linear_scores(indptr, indices, data, present, before, values, out[, portable]): a linear head's scores (stage.py)"},
    {"text_scores", text_scores, METH_VARARGS,
     "text_scores(texts, n_features, present, before, values, out[, portable]): a linear head's scores of texts' "
     "counts, without the counts (stage.py)"},
    {"normalised", normalised, METH_O, "normalised(case-folded text) -> the verdict cache's form of it (cache.py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ngrams",
    "The lexical stage's n-gram counts and heads' scores, and the verdict cache's normalised text, compiled.",
    -1,
    methods,
};

PyMODINIT_FUNC PyInit__ngrams(void) {
#ifdef POPCNT_DISPATCH
    __builtin_cpu_init();
    has_popcnt = __builtin_cpu_supports("popcnt");
#endif
    return PyModule_Create(&module);
}
